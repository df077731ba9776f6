"""Write the compiled pipeline YAML. Imports kfp and the components, never torch."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_YAML = REPO_ROOT / "pipeline.yaml"


def compile_pipeline(output: Path = PIPELINE_YAML) -> Path:
    from kfp import compiler

    from pipeline.definition import rlhf_pipeline

    compiler.Compiler().compile(rlhf_pipeline, str(output))
    return output
