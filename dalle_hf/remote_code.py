"""How a copy that carries dalle-hf's code (a repository `dalle-hf push` published, a folder `dalle-hf
convert-dalle-mini` wrote) names it in `model_index.json`, read back into the names dalle-hf saves, so that
dalle-hf's own classes load the copy without running its files (`DallePipeline.load_config`). The other direction,
copying the files in, is publishing's (`dalle_hf.hub.add_remote_code`).
"""

import os

# The package this file belongs to: dalle_hf when installed, diffusers' module cache when a published copy of it runs
# as remote code. A copy's `model_index.json` names these modules by their bare file names.
PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def model_index_without_code(index: dict, folder: str) -> dict:
    """The `model_index.json` of `folder`, a copy that carries its own code (a repository `dalle-hf push` published,
    a folder `dalle-hf convert-dalle-mini` wrote), with the names dalle-hf saves: `["pipeline_dalle_mini",
    "DalleMiniPipeline"]` -> `"DalleMiniPipeline"`, `["modeling_dalle_bart", "DalleBartForImageGeneration"]` ->
    `["dalle_hf.modeling_dalle_bart", "DalleBartForImageGeneration"]`. Any other index comes back equal.

    Only an entry whose code file is in the copy (`folder/<module>.py`, `folder/<component>/<module>.py`) and is one
    of this package's own modules is renamed; another code file keeps its name, and loading it needs
    `trust_remote_code`.
    """

    def own(module, where: str) -> bool:
        return isinstance(module, str) and "." not in module and all(
            os.path.isfile(os.path.join(d, f"{module}.py")) for d in (PACKAGE_DIR, where)
        )

    renamed = dict(index)
    for key, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        if key == "_class_name" and own(entry[0], folder):
            renamed[key] = entry[1]
        elif key != "_class_name" and own(entry[0], os.path.join(folder, key)):
            renamed[key] = [f"{PACKAGE}.{entry[0]}", entry[1]]
    return renamed


__all__ = ["model_index_without_code"]
