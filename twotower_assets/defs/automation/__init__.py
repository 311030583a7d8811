"""What starts runs without a person: the training job, its weekly schedule, the automation sensor."""
