"""Write pipeline.yaml from pipeline/definition.py (the same code path as `rlhf compile`)."""

from pipeline.compiler import compile_pipeline

if __name__ == "__main__":
    print(f"Wrote {compile_pipeline()}")
