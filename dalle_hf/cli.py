"""The `dalle-hf` command: thin subcommands that parse, call the library and print.

    dalle-hf generate --pipeline checkpoints/dalle-shapes "a red circle" --candidates 16 --keep 4 --out out/
    dalle-hf generate --pipeline dalle-mega-hf "a red circle" --device cuda --dtype float16 --quantization bnb-int8
    dalle-hf eval shapes --pipeline checkpoints/dalle-shapes --out eval/
    dalle-hf eval emoji-judge --cache /work/emoji-cache --out runs/emoji-judge   (EmojiEval's judge, once per cache)
    dalle-hf eval emoji --pipeline checkpoints/dalle-emoji --judge runs/emoji-judge --cache CACHE --out eval/emoji/
    dalle-hf eval vae --pipeline checkpoints/dalle-shapes
    dalle-hf eval clip --pipeline checkpoints/dalle-shapes
    dalle-hf eval classify --pipeline checkpoints/dalle-shapes   (likelihood zero-shot classification beside CLIP)
    dalle-hf compress image.png --caption "a red circle" --pipeline checkpoints/dalle-shapes --out image.dhfc
    dalle-hf decompress image.dhfc --pipeline checkpoints/dalle-shapes --out image.png
    dalle-hf push checkpoints/dalle-shapes org/dalle-shapes [--private] [--revision BRANCH]
    dalle-hf export-space space/ --model org/dalle-shapes
    dalle-hf export-space space/ --model org/dalle-mega-hf   (a t4-small GPU Space: float16, or int8 on a small GPU)
    dalle-hf convert-openai-dvae --encoder encoder.pkl --decoder decoder.pkl --out openai-dvae
    dalle-hf convert-dalle-mini --min-dalle pretrained --out dalle-mini [--mega]   (min-dalle's models_root)
    dalle-hf convert-dalle-mini --flax dalle-mini-snapshot --vqgan vqgan-snapshot --out dalle-mini
    dalle-hf train dvae|dalle|clip [training flags]   (same as python -m dalle_hf.train_<name>)
    dalle-hf data emoji --cache /work/emoji-cache   (fetch the pinned emoji packages, render the cache once)
"""

import argparse
import json
import os
import sys

from .loading import DEVICES, DTYPES, QUANTIZATIONS, load_pipeline

TRAINERS = {"dvae": "dalle_hf.train_dvae", "dalle": "dalle_hf.train_dalle", "clip": "dalle_hf.train_clip"}
FORWARDED = {("eval", "emoji-judge"): "dalle_hf.eval.emoji_judge"}  # subcommands whose flags a module's parser owns


def cmd_generate(args) -> int:
    import torch

    pipe = load_pipeline(args.pipeline, args.dtype, args.quantization, args.device)
    # a CPU generator on any device: the pipeline draws each token on the generator's device (`DallePipeline.draw`),
    # so a seed names the same random stream on a CPU and a GPU
    generator = torch.Generator().manual_seed(args.seed)
    out = pipe(
        args.prompt,
        num_images_per_prompt=args.candidates,
        num_images_to_keep=args.keep,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        generator=generator,
    )
    os.makedirs(args.out, exist_ok=True)
    for i, image in enumerate(out.images):
        path = os.path.join(args.out, f"{i:02d}.png")
        image.save(path)
        score = "" if out.clip_scores is None else f"  clip={out.clip_scores.flatten()[i].item():.3f}"
        print(f"{path}{score}")
    return 0


def sampling_kwargs(args) -> dict:
    """The sampling flags that were given (the rest keep the pipeline's defaults)."""
    names = ("temperature", "top_k", "top_p", "guidance_scale")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def parse_tasks(text: str) -> list[str]:
    """`--tasks`: `'novel,colors'` -> `['novel', 'colors']`, checked by ShapesEval's own task validation."""
    from .eval.shapes import _validate_tasks

    try:
        return list(_validate_tasks([t.strip() for t in text.split(",") if t.strip()]))
    except ValueError as error:  # a usage error before the pipeline is loaded
        raise argparse.ArgumentTypeError(f"expected comma-separated tasks: {error}") from None


def add_world_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="shapes", help="the world to evaluate on: shapes, emoji, ...")
    parser.add_argument("--data-dir", dest="data_dir", default=None, help="its data (emoji: the cache folder)")


def cmd_eval_shapes(args) -> int:
    from .eval.shapes import evaluate_pipeline

    pipe = load_pipeline(args.pipeline, args.dtype, args.quantization, args.device)
    report = evaluate_pipeline(
        pipe,
        args.out,
        images_per_prompt=args.images_per_prompt,
        candidates=args.candidates,
        seed=args.seed,
        prompts_per_task=args.prompts_per_task,
        batch_size=args.batch_size,
        prompt_seed=args.prompt_seed,
        sampling=sampling_kwargs(args),
        tasks=args.tasks,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    return 0


def parse_emoji_splits(text: str) -> list[str]:
    """`--splits`: `'seen,novel'` -> `['seen', 'novel']`, checked by EmojiEval's own split validation."""
    from .eval.emoji import parse_splits

    try:
        return list(parse_splits(text))
    except ValueError as error:  # a usage error before the pipeline is loaded
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_eval_emoji(args) -> int:
    from .eval.emoji import evaluate_emoji

    pipe = load_pipeline(args.pipeline, args.dtype, "none", args.device)
    pipe.set_progress_bar_config(disable=True)
    report = evaluate_emoji(
        pipe, args.judge, args.cache, args.out, prompts_per_split=args.prompts, candidates=args.candidates,
        seed=args.seed, splits=args.splits, batch_size=args.batch_size, n_vae=args.n_vae, n_clip=args.n_clip,
        prompt_seed=args.prompt_seed, sampling=sampling_kwargs(args),
    )
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    return 0


def eval_world(args):
    """The world `--dataset` / `--data-dir` name (`dalle_hf.data.world`); a usage error if they don't fit."""
    from .data.world import load_world

    try:
        return load_world(args.dataset, args.data_dir)
    except ValueError as error:
        raise SystemExit(f"dalle-hf eval {args.benchmark}: {error}".replace("--train_data_dir", "--data-dir")) from None


def cmd_eval_vae(args) -> int:
    from .modeling_dvae import DalleVAE

    world = eval_world(args)
    subfolder = "vae" if os.path.isdir(os.path.join(args.pipeline, "vae")) else ""
    vae = DalleVAE.from_pretrained(args.pipeline, subfolder=subfolder).eval()
    if args.dataset == "shapes":  # the full report: per-task fidelity and the checker's verdicts
        from .eval.shapes import evaluate_vae_fidelity

        report = evaluate_vae_fidelity(vae, n_per_task=args.n_per_task, seed=args.seed)
    else:
        report = world.evaluate_vae(vae, args.n_per_task, args.seed)
    print(json.dumps(report, indent=2))
    return 0


def cmd_eval_clip(args) -> int:
    from transformers import CLIPModel, CLIPProcessor

    from .train_clip import evaluate_clip_caption_ranking

    if not os.path.isdir(os.path.join(args.pipeline, "clip_model")):
        raise SystemExit(f"dalle-hf eval clip: {args.pipeline} has no clip_model/ folder (a pipeline saved with CLIP)")
    world = eval_world(args)
    if not world.has_ranking_set:
        raise SystemExit(f"dalle-hf eval clip: the {world.name} world has no caption-ranking set")
    model = CLIPModel.from_pretrained(args.pipeline, subfolder="clip_model").eval()
    processor = CLIPProcessor.from_pretrained(args.pipeline, subfolder="clip_processor")
    accuracy, per_task = evaluate_clip_caption_ranking(
        model, processor, n_images=args.n_images, n_captions=args.n_captions, seed=args.seed, return_per_task=True,
        world=world,
    )
    report = {"caption_top1": accuracy, "per_group": per_task, "world": world.name, "n_images": args.n_images,
              "n_captions": args.n_captions, "seed": args.seed}  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def cmd_eval_classify(args) -> int:
    from .eval.classification import zero_shot_classification

    world = eval_world(args)
    if not world.has_ranking_set:
        raise SystemExit(f"dalle-hf eval classify: the {world.name} world has no caption-ranking set")
    pipe = load_pipeline(args.pipeline, args.dtype, "none", args.device)
    ranking = world.caption_ranking_set(args.n_images, args.n_captions, args.seed)
    report = zero_shot_classification(
        pipe, ranking.pixel_values, ranking.candidates, ranking.groups, batch_size=args.batch_size
    )
    print(json.dumps({**report, "world": world.name, "seed": args.seed, "dtype": args.dtype}, indent=2))
    return 0


def cmd_convert_openai_dvae(args) -> int:
    from .convert_openai_dvae import convert_openai_dvae_files

    convert_openai_dvae_files(args.encoder, args.decoder, args.out)
    return 0


def cmd_convert_dalle_mini(args) -> int:
    from .convert_dalle_mini import DTYPES

    if (args.min_dalle is None) == (args.flax is None):
        raise ValueError("give either --min-dalle DIR or --flax DIR --vqgan DIR")
    dtype = DTYPES[args.dtype]
    if args.min_dalle is not None:
        if args.vqgan is not None:
            raise ValueError("--vqgan goes with --flax; min-dalle's VQGAN is its models_root's vqgan/detoker.pt")
        from .convert_dalle_mini import convert_min_dalle

        command = f"dalle-hf convert-dalle-mini --min-dalle {args.min_dalle} --out {args.out}" + (
            " --mega" if args.mega else "") + (f" --clip {args.clip}" if args.clip else "") + f" --dtype {args.dtype}"
        pipe = convert_min_dalle(args.min_dalle, args.out, mega=True if args.mega else None, dtype=dtype,
                                 clip_dir=args.clip, command=command)  # fmt: skip
    else:
        if args.vqgan is None:
            raise ValueError("--flax needs --vqgan DIR (a snapshot of dalle-mini/vqgan_imagenet_f16_16384)")
        if args.mega:
            raise ValueError("--mega goes with --min-dalle; a Flax snapshot's config.json says which model it is")
        from .convert_flax_dalle_mini import convert_flax

        command = f"dalle-hf convert-dalle-mini --flax {args.flax} --vqgan {args.vqgan} --out {args.out}" + (
            f" --clip {args.clip}" if args.clip else "") + f" --dtype {args.dtype}"
        pipe = convert_flax(args.flax, args.vqgan, args.out, clip_dir=args.clip, dtype=dtype, command=command)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote {args.out}: {n:,} transformer parameters ({args.dtype})")
    return 0


def cmd_push(args) -> int:
    from .hub import push_folder

    commit = push_folder(args.path, args.repo_id, private=args.private or None, revision=args.revision,
                         commit_message=args.commit_message)  # fmt: skip
    print(f"pushed {args.path} to {args.repo_id}" + (f" (branch {args.revision})" if args.revision else ""))
    print(getattr(commit, "commit_url", commit))
    return 0


def cmd_export_space(args) -> int:
    from .space import export_space

    files = export_space(args.dir, args.model, title=args.title, hardware=args.hardware)
    print(f"wrote {args.dir}: {', '.join(files)}")
    return 0


def cmd_compress(args) -> int:
    from .compression import LikelihoodCoder, raw_bits_per_code

    # on the CPU in float32 whatever the machine (no --device): decoding needs the probabilities the coder used, bit
    # for bit, and a file compressed on a GPU could not be read back on a CPU
    coder = LikelihoodCoder(load_pipeline(args.pipeline))
    data = coder.compress_image(args.image, args.caption)
    with open(args.out, "wb") as f:
        f.write(data)
    header, payload = coder.read_header(data)
    n = header.grid_size**2
    print(f"wrote {args.out}: {len(data)} bytes ({len(data) - len(payload)} of header, caption and checksum), "
          f"{8 * len(payload) / n:.3f} bits per code{' (raw: coding would not save bytes)' if header.flags else ''}; "
          f"the uniform code is {raw_bits_per_code(coder.vocab_size)} bits per code")  # fmt: skip
    return 0


def cmd_decompress(args) -> int:
    from .compression import LikelihoodCoder

    with open(args.file, "rb") as f:
        data = f.read()
    out = LikelihoodCoder(load_pipeline(args.pipeline)).decompress(data)
    out.image.save(args.out)
    print(f"wrote {args.out}: the dVAE reconstruction of {out.image_tokens.numel()} codes, caption {out.caption!r}")
    return 0


def cmd_data_emoji(args) -> int:
    from .data.emoji import build_emoji_cache

    summary = build_emoji_cache(args.cache, download_dir=args.download_dir, styles=args.styles, log=lambda line: None)
    print(f"{'style':<22}{'images':>8}{'held out':>10}{'duplicates':>12}{'unlabeled':>11}")
    for style, counts in summary["per_style"].items():
        print(f"{style:<22}{counts['images']:>8}{counts['held_out']:>10}{counts['duplicates_dropped']:>12}"
              f"{counts['unlabeled_dropped']:>11}")  # fmt: skip
    print(f"concepts {summary['concepts']}, images {summary['images']}, held-out pairs {summary['held_out_pairs']}, "
          f"median styles per concept {summary['median_styles_per_concept']:g}")  # fmt: skip
    print(f"wrote {args.cache} ({summary['cache_mb']} MB) in {summary['seconds']} s")
    return 0


def add_device_flags(parser: argparse.ArgumentParser, quantization: bool = True) -> None:
    """`--device`, `--dtype` and (with `quantization`) `--quantization`, the arguments of `load_pipeline`."""
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the pipeline runs (default auto: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="bfloat16: fast on CPUs with bf16 matmul; float16: CUDA only")
    if quantization:
        parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                            help="int8-dynamic: fast on CPU; bnb-*: GPU memory (bnb-int8 with --dtype float16 on a "
                                 "GPU: LLM.int8 computes in float16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-hf", description="DALL-E (v1) the Hugging Face way.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text -> CLIP-ranked images (PNG files)")
    gen.add_argument("prompt", help="the caption")
    gen.add_argument("--pipeline", required=True, help="a saved DallePipeline folder or hub id")
    gen.add_argument("--candidates", type=int, default=16, help="images sampled (N)")
    gen.add_argument("--keep", type=int, default=4, help="images kept after CLIP reranking (k)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--top_p", type=float, default=None)
    gen.add_argument(
        "--guidance_scale", type=float, default=None, help="default: the checkpoint's default_guidance_scale"
    )
    gen.add_argument("--negative_prompt", default=None, help="what guidance steers away from, e.g. 'a square' for "
                     "'a cyan square' (needs guidance > 1)")
    gen.add_argument("--seed", type=int, default=0)
    add_device_flags(gen)
    gen.add_argument("--out", default="outputs", help="folder for the PNGs")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    shapes = ev.add_parser("shapes", help="ShapesEval: GenEval-style exact checks on the shapes world")
    shapes.add_argument("--pipeline", required=True)
    shapes.add_argument("--images-per-prompt", dest="images_per_prompt", type=int, default=4)
    shapes.add_argument("--candidates", type=int, default=1, help="N > 1 adds the CLIP-reranked best-of-N pass")
    shapes.add_argument("--prompts-per-task", dest="prompts_per_task", type=int, default=100)
    shapes.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="prompts per pipeline call")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--prompt-seed", dest="prompt_seed", type=int, default=0,
        help="selects the prompts: report on 0, tune sampling settings on another (a dev split)",
    )
    shapes.add_argument(
        "--tasks", type=parse_tasks, default=None,
        help="comma-separated subset of the tasks, e.g. 'novel' or 'colors,color_attr' (default: all seven)",
    )
    shapes.add_argument("--temperature", type=float, default=None, help="default: the pipeline's")
    shapes.add_argument("--top-k", dest="top_k", type=int, default=None, help="default: the pipeline's")
    shapes.add_argument("--top-p", dest="top_p", type=float, default=None, help="default: the pipeline's")
    shapes.add_argument(
        "--guidance-scale", dest="guidance_scale", type=float, default=None, help="default: the pipeline's"
    )
    add_device_flags(shapes)
    shapes.add_argument("--out", required=True, help="folder for report.json and the sample sheets")
    shapes.set_defaults(func=cmd_eval_shapes)
    emoji_eval = ev.add_parser("emoji", help="EmojiEval: concept and style of generated emoji by a trained judge, "
                               "dVAE fidelity, CLIP retrieval, Fréchet distance (docs/emoji-world.md)")  # fmt: skip
    emoji_eval.add_argument("--pipeline", required=True, help="an emoji pipeline folder (e.g. checkpoints/dalle-emoji)")
    emoji_eval.add_argument("--judge", required=True, help="the judge folder (dalle-hf eval emoji-judge --out)")
    emoji_eval.add_argument("--cache", required=True, help="the emoji cache (dalle-hf data emoji --cache DIR)")
    emoji_eval.add_argument("--out", required=True, help="folder for report.json and the sample sheets")
    emoji_eval.add_argument("--prompts", type=int, default=60, help="prompts per generated split")
    emoji_eval.add_argument("--candidates", type=int, default=16, help="samples per prompt: CLIP best-of-N and the "
                            "mean of all N (best-of-1) from one call")  # fmt: skip
    emoji_eval.add_argument("--seed", type=int, default=0)
    emoji_eval.add_argument("--prompt-seed", dest="prompt_seed", type=int, default=0, help="selects the prompts")
    emoji_eval.add_argument("--splits", type=parse_emoji_splits, default=None,
                            help="comma-separated among seen,novel,plain,vae,clip (default: all)")  # fmt: skip
    emoji_eval.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="samples per pipeline call")
    emoji_eval.add_argument("--n-vae", dest="n_vae", type=int, default=300, help="held-out renders for `vae`")
    emoji_eval.add_argument("--n-clip", dest="n_clip", type=int, default=300, help="renders per group for `clip`")
    emoji_eval.add_argument("--temperature", type=float, default=None, help="default: the pipeline's")
    emoji_eval.add_argument("--top-k", dest="top_k", type=int, default=None, help="default: the pipeline's")
    emoji_eval.add_argument("--top-p", dest="top_p", type=float, default=None, help="default: the pipeline's")
    emoji_eval.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=None,
                            help="default: the pipeline's")  # fmt: skip
    add_device_flags(emoji_eval, quantization=False)
    emoji_eval.set_defaults(func=cmd_eval_emoji)
    # Flags forwarded to `python -m dalle_hf.eval.emoji_judge` by `main` (like `train`): one definition of them.
    ev.add_parser("emoji-judge", add_help=False, help="train EmojiEval's judge on an emoji cache (about 10 minutes on "
                  "one CPU core; see python -m dalle_hf.eval.emoji_judge --help)")  # fmt: skip
    vae = ev.add_parser("vae", help="dVAE fidelity: shapes reconstructions that still pass the ShapesEval checker; "
                        "emoji PSNR on held-out renders")  # fmt: skip
    vae.add_argument("--pipeline", required=True, help="a pipeline folder (uses vae/) or a dVAE folder")
    vae.add_argument("--n-per-task", dest="n_per_task", type=int, default=300, help="shapes: per task; emoji: in all")
    vae.add_argument("--seed", type=int, default=0)
    add_world_flags(vae)
    vae.set_defaults(func=cmd_eval_vae)
    clip = ev.add_parser("clip", help="CLIP: top-1 of the true caption among N captions of the world")
    clip.add_argument("--pipeline", required=True, help="a pipeline folder with clip_model/ and clip_processor/")
    clip.add_argument("--n-images", dest="n_images", type=int, default=300)
    clip.add_argument("--n-captions", dest="n_captions", type=int, default=32, help="the true one and N - 1 false ones")
    clip.add_argument("--seed", type=int, default=0)
    add_world_flags(clip)
    clip.set_defaults(func=cmd_eval_clip)

    classify = ev.add_parser(
        "classify", help="zero-shot classification by likelihood beside CLIP: top-1 of the true caption among N "
        "candidates of the world's caption-ranking set, the set `eval clip` uses (shapes: captions of the same scene; "
        "emoji: the styled caption among other concepts and styles)",
    )
    classify.add_argument("--pipeline", required=True)
    classify.add_argument("--n-images", dest="n_images", type=int, default=120, help="images of the ranking set "
                          "(shapes: fresh renders balanced over the six training tasks; emoji: a fixed draw of "
                          "renders)")  # fmt: skip
    classify.add_argument("--n-captions", dest="n_captions", type=int, default=8, help="the true one and N - 1 false "
                          "ones; each costs a teacher-forced pass over the image")  # fmt: skip
    classify.add_argument("--seed", type=int, default=0)
    add_world_flags(classify)
    classify.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="pairs per forward pass")
    add_device_flags(classify, quantization=False)
    classify.set_defaults(func=cmd_eval_classify)

    conv = sub.add_parser(
        "convert-openai-dvae", help="OpenAI's released dVAE (encoder.pkl, decoder.pkl) -> a DalleVAE folder"
    )
    conv.add_argument("--encoder", required=True, help="encoder.pkl (read weights-only: no code runs) or a state dict")
    conv.add_argument("--decoder", required=True, help="decoder.pkl or a state dict (.pt / .safetensors)")
    conv.add_argument("--out", required=True, help="folder for config.json and model.safetensors")
    conv.set_defaults(func=cmd_convert_openai_dvae)

    mini = sub.add_parser(
        "convert-dalle-mini", help="DALL·E mini / Mega (min-dalle's files or the Flax snapshots) -> a pipeline folder"
    )
    mini.add_argument("--min-dalle", dest="min_dalle", help="min-dalle's models_root (dalle_bart_mini/ or "
                      "dalle_bart_mega/ with encoder.pt, decoder.pt, vocab.json, merges.txt; vqgan/detoker.pt)")
    mini.add_argument("--flax", help="a local snapshot of dalle-mini/dalle-mini or dalle-mini/dalle-mega")
    mini.add_argument("--vqgan", help="with --flax: a local snapshot of dalle-mini/vqgan_imagenet_f16_16384")
    mini.add_argument("--out", required=True, help="the pipeline folder to write, with its code: "
                      "DalleMiniPipeline.from_pretrained(OUT) and DiffusionPipeline.from_pretrained(OUT, "
                      "trust_remote_code=True) load it")
    mini.add_argument("--mega", action="store_true", help="with --min-dalle: convert dalle_bart_mega/")
    mini.add_argument("--clip", help="a transformers CLIPModel folder to rerank with (optional)")
    mini.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                      help="storage dtype of the weights")
    mini.set_defaults(func=cmd_convert_dalle_mini)

    push = sub.add_parser(
        "push", help="publish a pipeline folder to the Hub with its card, sample grid and code (trust_remote_code)"
    )
    push.add_argument("path", help="a saved DallePipeline folder, e.g. checkpoints/dalle-shapes")
    push.add_argument("repo_id", help="the Hub repository, org/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="the branch to commit to (created if missing; default main)")
    push.add_argument("--commit-message", dest="commit_message", default=None)
    push.set_defaults(func=cmd_push)

    space = sub.add_parser("export-space", help="a Hugging Face Space folder (Gradio) that runs a published model")
    space.add_argument("dir", help="the folder to write app.py, requirements.txt and README.md into")
    space.add_argument("--model", required=True, help="the published model, org/name")
    space.add_argument("--title", default=None, help="the Space's title (default: 'DALL-E <name>')")
    space.add_argument("--hardware", default=None, help="suggested_hardware, e.g. cpu-basic, t4-small, l4x1 "
                       "(default: t4-small for DALL·E mini / Mega, cpu-basic otherwise); on a GPU the Space loads "
                       "DALL·E mini / Mega in float16, or int8 when the GPU's memory is short")
    space.set_defaults(func=cmd_export_space)

    lossless = ("Lossless for the codes, lossy for the pixels: the file holds the image's dVAE codes exactly, "
                "decompressing gives their dVAE reconstruction, not the original pixels.")
    comp = sub.add_parser(
        "compress", help="image -> its dVAE codes, range-coded under the transformer given a caption",
        description="Compress an image: its dVAE codes, arithmetic-coded under the transformer's next-code "
                    "distribution given the caption. " + lossless,
    )
    comp.add_argument("image", help="an image file (center-cropped and resized to the dVAE's size)")
    comp.add_argument("--caption", default="", help="text the codes are coded under (stored in the file); "
                      "a true caption makes the file smaller. Default: none (unconditional)")
    comp.add_argument("--pipeline", required=True, help="a saved DallePipeline folder; the same one must decompress")
    comp.add_argument("--out", required=True, help="the compressed file")
    comp.set_defaults(func=cmd_compress)
    decomp = sub.add_parser(
        "decompress", help="a compressed file -> the exact dVAE codes -> their reconstruction (PNG)",
        description="Decompress a file of `dalle-hf compress` with the same pipeline. " + lossless,
    )
    decomp.add_argument("file", help="a file written by dalle-hf compress")
    decomp.add_argument("--pipeline", required=True, help="the pipeline that compressed it (another is refused)")
    decomp.add_argument("--out", required=True, help="the reconstruction, e.g. image.png")
    decomp.set_defaults(func=cmd_decompress)

    data = sub.add_parser("data", help="build a world's data cache").add_subparsers(dest="world", required=True)
    emoji = data.add_parser("emoji", help="fetch the pinned emoji packages (npm, Debian) and render them once into a "
                            "compressed cache (needs the `data` extra: resvg-py)")  # fmt: skip
    emoji.add_argument("--cache", required=True, help="folder for emoji.npz and emoji.json")
    emoji.add_argument("--download-dir", dest="download_dir", default=None,
                       help="folder for the packages (default: CACHE/downloads); unpacked ones are not fetched again")
    emoji.add_argument("--styles", nargs="+", default=None, help="a subset of the 11 styles, e.g. noto 'noto blob' "
                       "(default: all)")  # fmt: skip
    emoji.set_defaults(func=cmd_data_emoji)

    train = sub.add_parser("train", help="train a model (see python -m dalle_hf.train_<name> --help)", add_help=False)
    train.add_argument("model", choices=sorted(TRAINERS))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        if len(argv) < 2 or argv[1] not in TRAINERS:
            build_parser().parse_args(argv)  # prints the usage error
        import importlib

        module = importlib.import_module(TRAINERS[argv[1]])
        module.main(module.parse_args(argv[2:]))
        return 0
    if tuple(argv[:2]) in FORWARDED:
        import importlib

        module = importlib.import_module(FORWARDED[tuple(argv[:2])])
        return module.main(module.parse_args(argv[2:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:  # bad input found by the library (e.g. a sampling setting): a message, not a trace
        parser.exit(2, f"dalle-hf {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
