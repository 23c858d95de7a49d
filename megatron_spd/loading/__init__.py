"""Layer "loading": any source -> a model at the current TP with its plan.

``sources`` (where weights come from: HF, GGUF + its cache, checkpoint, the default; the dense
origin), ``open_model`` (``open_model``: build, load, check the plan), ``convert`` (what
``tools/convert_checkpoint.py`` runs: a source -> checkpoint or Hugging Face directory).
"""
