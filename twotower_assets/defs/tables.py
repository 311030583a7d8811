"""Names of the warehouse tables the graph reads and writes (unqualified)."""

CLICK_EVENTS = "click_events"
TRAINING_EVENTS = "training_events"
VALIDATION_EVENTS = "validation_events"
TEST_EVENTS = "test_events"
SPLIT_TABLES = {"training": TRAINING_EVENTS, "validation": VALIDATION_EVENTS, "test": TEST_EVENTS}

USER_EMBEDDING_HISTORY = "two_tower_user_embedding_history"
ITEM_EMBEDDING_HISTORY = "two_tower_item_embedding_history"
USER_EMBEDDING_LATEST = "two_tower_user_embedding_latest"
ITEM_EMBEDDING_LATEST = "two_tower_item_embedding_latest"

PARTITION_COLUMN = "train_date"
