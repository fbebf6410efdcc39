"""lm-evaluation-harness model "smallscale": evaluate a run directory in-process with `lm_eval`.

    import smallscale.eval.lm_eval_adapter  # registers the model name
    lm_eval.simple_evaluate(model="smallscale", model_args="pretrained=RUN_DIR", tasks=[...])

model_args: `pretrained` (the run directory), `checkpoint` (default: latest complete), `dataset_dir`
(where the run's tokenizer lives, if data.path moved), `device` (default: cuda if available),
`batch_size` (default 64; "auto" means the default), `seed` (sampling in generate_until).

The three request types reuse smallscale's own evaluation code, so a task scored here and by
`smallscale eval` gets the same numbers:
- `loglikelihood`          `scoring.loglikelihood` (lm-eval's context/continuation conventions);
- `loglikelihood_rolling`  `tasks.perplexity.text_loss`: disjoint windows of the model's context,
                           the first token predicted from EOS, the last window given full context;
- `generate_until`         `generate.generate` with the KV cache, greedy unless `do_sample`; the
                           prompt keeps its last `seq_len - max_gen_toks` tokens, as lm-eval's HFLM.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from smallscale.data.tokenizer import eos_id
from smallscale.errors import UserError
from smallscale.eval.generate import cut_at_eos, generate
from smallscale.eval.runs import load_run
from smallscale.eval.scoring import loglikelihood
from smallscale.eval.tasks.perplexity import text_loss

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@register_model("smallscale")
class SmallscaleLM(LM):
    def __init__(
        self,
        pretrained: str,
        checkpoint: str | None = None,
        dataset_dir: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it for "auto" batch sizes; unused here
        seed: int = 1234,
    ) -> None:
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        run = load_run(pretrained, checkpoint, device=device, dataset_dir=dataset_dir)
        self.run = run
        self.model, self.tokenizer = run.model, run.tokenizer
        self._device = torch.device(device)
        self.batch_size = _batch_size(batch_size)
        self.seed = int(seed)

    @property
    def max_length(self) -> int:
        return self.model.cfg.seq_len

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under results["config"]: which weights were evaluated."""
        return {"run_dir": str(self.run.run_dir), "checkpoint": self.run.checkpoint.name, "step": self.run.step}

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        results = loglikelihood(self.model, self.tokenizer, pairs, self.batch_size, self._device)
        out = []
        for pair, result in zip(pairs, results, strict=True):
            answer = (result.logprob, result.is_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            if not self.tokenizer.encode(text, add_special_tokens=False).ids:
                total = 0.0  # nothing to predict: log p(empty string) = 0
            else:
                stats = text_loss(
                    self.model, self.tokenizer, [text], self.max_length, eos_id(self.tokenizer),
                    batch_size=self.batch_size, device=self._device,
                )  # fmt: skip
                total = -stats["loss"] * stats["tokens"]  # mean NLL x tokens = summed log-prob
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        # Rows of one `generate` call share a prompt length and settings: group by both, keep order.
        groups: dict[tuple, list[int]] = {}
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            prompt, settings, until = self._prepare_generation(context, dict(gen_kwargs))
            prepared.append((prompt, until))
            groups.setdefault((len(prompt), settings), []).append(i)

        eos = eos_id(self.tokenizer)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        out: list[str] = [""] * len(requests)
        for (length, (max_new, temperature, top_k, top_p)), rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                input_ids = torch.tensor([prepared[i][0] for i in chunk], dtype=torch.long, device=self._device)
                tokens = generate(self.model, input_ids, max_new, temperature, top_k, top_p, eos, generator=generator)
                for i, new_ids in zip(chunk, tokens[:, length:].tolist(), strict=True):
                    text = self.tokenizer.decode(cut_at_eos(new_ids, eos), skip_special_tokens=True)
                    out[i] = _cut_at_stop(text, prepared[i][1])
        for req, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _prepare_generation(self, context: str, gen_kwargs: dict[str, Any]) -> tuple[list[int], tuple, list[str]]:
        """(prompt ids, (max_new_tokens, temperature, top_k, top_p), stop strings) for one request."""
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise UserError(
                f"generation settings {unknown} are not supported by the smallscale lm-eval model; "
                f"use only {sorted(GEN_KWARGS)}"
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        # Keep at least one prompt token: the budget is capped at seq_len - 1 new tokens.
        max_new = min(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1)
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0
        top_k = gen_kwargs.get("top_k") if sample else None
        top_p = gen_kwargs.get("top_p") if sample else None
        # after an EOS, as generate_text and the scoring engine do: every training document follows one
        ids = [eos_id(self.tokenizer), *self.tokenizer.encode(context, add_special_tokens=False).ids]
        prompt = ids[-(self.max_length - max_new) :]  # left-truncate so prompt + new tokens fit
        settings = (max_new, temperature, None if top_k is None else int(top_k), None if top_p is None else float(top_p))
        return prompt, settings, until


def _cut_at_stop(text: str, until: list[str]) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _batch_size(value: int | str | None) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto:")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise UserError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size
