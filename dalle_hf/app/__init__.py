"""The Gradio app's parts; `app.py` at the repository's top is its entry point (`python app.py`, a Space runs it).

- `models`: which models exist (checkpoint folders), how a model family loads (`ModelFamily` -> `AppModel`)
- `inputs`: checks of every value a request carries (settings, prompts, uploaded images, the editor's mask)
- `components`: the checked Gradio components, and `CheckedBlocks` (a message and one log line per refusal)
- `sampling`: the pipeline in a worker thread, streamed previews, cancellation, memory given back
- `handlers`: the event handlers (text to images, variations, edit, and the small updates between them)
- `world`: the selected model's `world.json` (examples, styles, the words it was trained on)
- `layout`: `build_demo()`, the page wired to the handlers

The parts import the pipelines, never the reverse; nothing here is imported by `dalle_hf` itself.
"""
