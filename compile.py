"""Write pipeline.yaml from pipeline/definition.py (the same code path as `rlhf compile`)."""

from pathlib import Path

from rlhf.pipeline.compiler import compile_pipeline

if __name__ == "__main__":
    print(f"Wrote {compile_pipeline(Path(__file__).resolve().parent / 'pipeline.yaml')}")
