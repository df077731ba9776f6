"""The pipeline DAG (`rlhf_pipeline`), its compilation, and running it locally."""
