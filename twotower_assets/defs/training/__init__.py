"""The tf.data input and the trained two-tower model of each training date."""
