"""Base against tuned: bulk inference, the judges (reward model and rule), the metrics and the report."""
