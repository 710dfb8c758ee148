"""The original recipe this project improves on, as it was written: transformers in float32,
`model.generate(max_new_tokens=10, do_sample=False)` on the original prompt, then "Positive"
looked for in the generated text. Kept only as the benchmark's baseline."""

from __future__ import annotations

from pathlib import Path

from .bench import BaselineResult, label_from_generated


class OriginalRecipe:
    """`settings` (a settings.Settings) sizes the engine that loads the weights."""

    def __init__(self, model_path: Path, prompt_template: str, settings, *, max_new_tokens: int | None = 10):
        from ..engine.transformers import TransformersEngine

        # Our transformers engine only loads the weights (a GGUF is dequantised to float32); the
        # recipe below uses nothing of ours: Hugging Face's tokenizer and generate().
        self.engine = TransformersEngine(
            model_path,
            dtype="float32",
            threads=settings.threads,
            n_lanes=1,
            context_size=settings.context_size,
            batch_size=settings.batch_size,
        )
        self.model, self.tokenizer = self.engine.hf_model, self.engine.hf_tokenizer
        self.prompt_template = prompt_template
        self.max_new_tokens = max_new_tokens

    def analyze(self, text: str) -> BaselineResult:
        import torch

        inputs = self.tokenizer(self.prompt_template.replace("{text}", text), return_tensors="pt")
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.eos_token_id
            )
        generated = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return label_from_generated(generated)
