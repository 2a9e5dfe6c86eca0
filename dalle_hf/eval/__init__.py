"""Benchmarks, one file per world (or per question). They import the worlds and the pipelines; nothing below them
imports a benchmark, so a world that has one is named here, where `train_dalle.py` asks for it."""


def evaluate_during_training(world, pipe, output_dir: str, prompts_per_task: int) -> dict:
    """
    The world's benchmark on a freshly trained pipeline (`train_dalle.py --eval_prompts_per_task N`).

    Args:
        world (`World`): the training run's world (`dalle_hf.data.world.load_world`).
        pipe (`DallePipeline`): the trained pipeline.
        output_dir (`str`): where the benchmark writes its report and sample sheets.
        prompts_per_task (`int`): prompts per task (or per split).

    Returns:
        `dict`: the results for the model card, `{}` for a world with no benchmark that runs without extra data
        (the emoji world's needs a trained judge: `dalle-hf eval emoji`).
    """
    if world.name == "shapes":
        from .shapes import evaluate_during_training as evaluate_shapes

        return evaluate_shapes(pipe, output_dir, prompts_per_task)
    return {}
