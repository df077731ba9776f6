"""Write the compiled pipeline YAML. Imports kfp and the components, never torch."""

from pathlib import Path

# The compiled pipeline the package ships: in a checkout, a link to pipeline.yaml at the top of the repository.
PIPELINE_YAML = Path(__file__).resolve().parent / "pipeline.yaml"


def compile_pipeline(output: Path) -> Path:
    from kfp import compiler

    from rlhf.pipeline.definition import rlhf_pipeline

    compiler.Compiler().compile(rlhf_pipeline, str(output))
    return output
