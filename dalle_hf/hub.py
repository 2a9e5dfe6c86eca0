"""Publishing a `DallePipeline` to the Hugging Face Hub so that it loads without dalle-hf installed.

    dalle-hf push checkpoints/dalle-shapes org/dalle-shapes [--private] [--revision BRANCH]
    pipe.push_to_hub("org/dalle-shapes")

The published repository is the saved pipeline folder plus what diffusers' and transformers' remote-code
mechanisms need (diffusers `custom pipelines` and `custom components`, transformers `auto_map`):

- `pipeline_dalle.py` (and the modules it imports relatively) at the root, and `model_index.json`'s
  `_class_name` as `["pipeline_dalle", "DallePipeline"]`: diffusers loads the pipeline class from that file;
- `transformer/modeling_dalle.py`, `vae/modeling_dvae.py` (with their relative imports) and their entries as
  `["modeling_dalle", "DalleForImageGeneration"]`: diffusers loads a component from `<folder>/<module>.py`;
- `auto_map` in each of those `config.json` files, so `AutoModel.from_pretrained(repo, subfolder="transformer",
  trust_remote_code=True)` works too;
- the model card written by `dalle_hf.model_card` from the folder's `card_data.json`, and the sample grid.

A converted DALL·E mini / Mega folder publishes the same way: `pipeline_dalle_mini.py` (with the inpainting and
variation pipelines it builds on) and `transformer/modeling_dalle_bart.py`; its VQGAN is diffusers' own `VQModel`,
which needs no code. Its card is `dalle_mini_card_data`'s, and no sample grid is drawn on the way (Mega takes minutes
per image on a CPU).

So `DiffusionPipeline.from_pretrained("org/name", trust_remote_code=True)` needs only diffusers and transformers.
The module files are dalle-hf's own, copied verbatim (they import each other only relatively). The shipped
checkpoints' `model_index.json` keep their `dalle_hf.*` module paths; `dalle-hf convert-dalle-mini` writes its folder
with the code already (`add_remote_code`), and pushing it copies this dalle-hf's files over the folder's. dalle-hf's
own classes load a copy with code as they load their own folders, running none of the copied files
(`DallePipeline.from_pretrained`, `dalle_hf.remote_code`).
"""

import importlib
import json
import os
import re
import shutil
import tempfile

from .model_card import CARD_DATA_NAME, SAMPLE_GRID_NAME, read_card_data, write_model_card, write_sample_grid
from .remote_code import model_index_without_code

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE = __name__.split(".")[0]  # "dalle_hf"
# diffusers' own pattern (utils/dynamic_modules_utils.get_relative_imports): the files it copies with a module.
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\S+)\s+import|import\s+\.(\S+)\s*$)", re.MULTILINE)
_ABSOLUTE_OWN_IMPORT = re.compile(rf"^\s*(?:from|import)\s+{PACKAGE}\b", re.MULTILINE)
NOT_PUBLISHED = (CARD_DATA_NAME,)  # the card's structured source stays in the checkpoint; README.md is its output


def module_files(module: str) -> list[str]:
    """`module.py` and every dalle_hf module it imports relatively, recursively (as diffusers will copy them)."""
    found, todo = [], [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = os.path.join(PACKAGE_DIR, f"{name}.py")
        if "." in name or not os.path.isfile(path):
            raise ValueError(f"{PACKAGE}.{name} cannot ship as remote code: expected a module file {path}")
        source = open(path, encoding="utf-8").read()
        if _ABSOLUTE_OWN_IMPORT.search(source):
            raise ValueError(f"{path} imports {PACKAGE} by name: remote code must import its siblings relatively")
        found.append(name)
        todo += [a or b for a, b in _RELATIVE_IMPORT.findall(source)]
    return sorted(f"{name}.py" for name in found)


def _own_module(library: str | None) -> str | None:
    """`"dalle_hf.modeling_dalle"` -> `"modeling_dalle"`; None for other libraries."""
    if isinstance(library, str) and library.startswith(PACKAGE + "."):
        return library.split(".", 1)[1]
    return None


def add_remote_code(folder: str) -> None:
    """Make a saved pipeline folder loadable with `trust_remote_code=True` without dalle-hf (in place). A folder that
    carries the code already (a converted one) gets this dalle-hf's files in place of the ones it has."""
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = model_index_without_code(json.load(f), folder)
    for component, entry in index.items():
        module = _own_module(entry[0]) if isinstance(entry, list) and len(entry) == 2 else None
        if module is None:
            continue
        for name in module_files(module):
            shutil.copyfile(os.path.join(PACKAGE_DIR, name), os.path.join(folder, component, name))
        index[component] = [module, entry[1]]
        model_class = getattr(importlib.import_module(f"{PACKAGE}.{module}"), entry[1])
        config_class = getattr(model_class, "config_class", None)
        config_path = os.path.join(folder, component, "config.json")
        if config_class is not None and os.path.isfile(config_path):  # transformers' remote code for AutoModel
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            config_module = config_class.__module__.rsplit(".", 1)[1]
            config["auto_map"] = {"AutoConfig": f"{config_module}.{config_class.__name__}",
                                  "AutoModel": f"{module}.{model_class.__name__}"}  # fmt: skip
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
    pipeline_class = index["_class_name"]
    if isinstance(pipeline_class, str):
        pipeline_module = getattr(importlib.import_module(PACKAGE), pipeline_class).__module__.split(".", 1)[1]
        for name in module_files(pipeline_module):
            shutil.copyfile(os.path.join(PACKAGE_DIR, name), os.path.join(folder, name))
        index["_class_name"] = [pipeline_module, pipeline_class]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def export_for_hub(source: str, out: str, repo_id: str | None = None, pipe=None) -> list[str]:
    """Write the publishable copy of the pipeline folder `source` into `out`; returns its files, sorted.

    Weights, configs and tokenizer files are copied byte for byte; the sample grid is drawn (with `pipe`, or the
    pipeline loaded from `source`) only if `source` has none; the card is `dalle_hf.model_card`'s, for `repo_id`.
    """
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ValueError(f"expected a saved DallePipeline folder (with model_index.json), got {source!r}")
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    # A converted model's grid is drawn where it runs (`python -m dalle_hf.model_card DIR --sample-grid`), not on
    # the way to the Hub: DALL·E Mega takes minutes per image on a CPU.
    if not os.path.isfile(os.path.join(out, SAMPLE_GRID_NAME)) and not read_card_data(out).get("conversion"):
        write_sample_grid(out, pipe)  # with dalle-hf's own pipeline class, whether `source` carries code or not
    add_remote_code(out)
    write_model_card(out, name_or_path=repo_id or source, repo_id=repo_id)
    for name in NOT_PUBLISHED:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    files = (os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names)
    return sorted(f.replace(os.sep, "/") for f in files)


def push_folder(
    source: str,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    pipe=None,
):
    """Publish the pipeline folder `source` to `repo_id` (created if missing; `private` applies on creation).

    `revision` names a branch (created from main if missing). Returns `huggingface_hub.CommitInfo`.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = export_for_hub(source, tmp, repo_id=repo_id, pipe=pipe)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            revision=revision,
            commit_message=commit_message or f"Upload DallePipeline ({len(files)} files)",
            create_pr=create_pr,
        )


def push_pipeline(pipe, repo_id: str, **kwargs):
    """`pipe.push_to_hub`: save the pipeline, keep its checkpoint's card data and sample grid, and `push_folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        origin = pipe.config.get("_name_or_path")
        for name in (CARD_DATA_NAME, SAMPLE_GRID_NAME):  # a pipeline loaded from a checkpoint folder keeps its card
            if isinstance(origin, str) and os.path.isfile(os.path.join(origin, name)):
                shutil.copyfile(os.path.join(origin, name), os.path.join(tmp, name))
        return push_folder(tmp, repo_id, pipe=pipe, **kwargs)


__all__ = ["add_remote_code", "export_for_hub", "module_files", "push_folder", "push_pipeline"]
