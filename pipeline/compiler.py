"""Write the compiled pipelines' YAML. Imports kfp and the components, never torch."""

from pathlib import Path

# The compiled pipelines the package ships: in a checkout, links to the files at the top of the repository.
# `rlhf_pipeline` tunes; `infer_pipeline` is GCPC's bulk inference without tuning.
COMPILED = {"rlhf": Path(__file__).resolve().parent / "pipeline.yaml",
            "infer": Path(__file__).resolve().parent / "infer_pipeline.yaml"}
PIPELINE_YAML = COMPILED["rlhf"]


def compile_pipeline(output: Path, pipeline: str = "rlhf") -> Path:
    from kfp import compiler

    from rlhf.pipeline import definition

    compiler.Compiler().compile(definition.PIPELINES[pipeline], str(output))
    return output
