"""lorafit as an lm-evaluation-harness model: `--model lorafit --model_args checkpoint=...,adapter=...`.

lm-eval (0.4.x) finds a model by name in its registry, which this module fills when it is imported;
lm-eval itself does not import lorafit. So from the command line run lm-eval through this module,
`python -m lorafit.lm_eval_model run --model lorafit --model_args checkpoint=DIR,adapter=RUN --tasks
hellaswag`, or `lorafit evaluate --tasks hellaswag ...`; from Python, `import lorafit.lm_eval_model`
before `lm_eval.simple_evaluate(model="lorafit", ...)`.

Scoring follows lm-eval's own Hugging Face model (HFLM) token for token: the same context /
continuation split (lm_eval's TemplateLM), BOS or EOS before an empty context, the same rolling
windows for perplexity and the same left truncation, so the numbers agree with `--model hf` on the
merged model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
except ImportError as error:  # the optional extra
    raise RuntimeError(
        'lm-evaluation-harness is not installed; install it with: pip install "lorafit[eval]"'
    ) from error

from lorafit.model import LLaMA


@register_model("lorafit")
class LorafitLM(TemplateLM):
    """A lorafit model (base checkpoint, optionally an adapter) answering lm-eval's requests."""

    def __init__(
        self,
        checkpoint: str | None = None,
        adapter: str | None = None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        dtype: str | None = None,
        device: str | None = None,
        model: LLaMA | None = None,
        tokenizer: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if model is None:
            from lorafit.generate import LLM

            if device and device.startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's command line asks for cuda by default; as its hf model, take what there is

            llm = LLM.load(checkpoint, adapter, dtype=dtype, device=device)
            model, tokenizer = llm.model, llm.tokenizer
        self.model, self.tokenizer = model.eval(), tokenizer
        # lm-eval passes its own --batch_size (None, a number, or "auto", which is for its hf model).
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length) if max_length else model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        self._device = model.embed_tokens.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: the token before an empty context (and the first rolling window) is BOS, else EOS.
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as transformers' tokenizer.encode gives them (no BOS when the text already starts with it)."""
        if add_special_tokens is None:
            bos_text = self.tokenizer.decode([self.prefix_token_id])
            add_special_tokens = None if not (bos_text and string.startswith(bos_text)) else False
        if add_special_tokens is False:
            return self.tokenizer.encode(string, bos=False, eos=False)
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kw: Any) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        inputs = []
        for _, context, continuation in requests:
            # As HFLM: the model sees at most max_length tokens, cut from the left, the last one never fed.
            tokens = (context + continuation)[-(self.max_length + 1) :][:-1]
            inputs.append((tokens, min(len(continuation), len(tokens))))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            longest = max(len(inputs[i][0]) for i in rows)
            idx = torch.zeros(len(rows), longest, dtype=torch.long, device=self._device)
            for r, i in enumerate(rows):
                idx[r, : len(inputs[i][0])] = torch.tensor(inputs[i][0])
            hidden = self.model.hidden_states(idx)  # right padding: causal attention keeps it out of every row
            for r, i in enumerate(rows):
                tokens, n = inputs[i]
                _, _, continuation = requests[i]
                logits = self.model.lm_head(hidden[r, len(tokens) - n : len(tokens)]).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(continuation[-n:], device=self._device)
                total = logprobs.gather(-1, target[:, None]).sum().item()
                results[i] = (total, bool((logits.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in HFLM's disjoint windows of max_length tokens."""
        results = []
        for (text,) in [request.args for request in requests]:
            windows = map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scored = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            total = sum(logprob for logprob, _ in scored)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when asked) continuations, cut at the first stop string."""
        from lorafit.generate import generate_batch

        results = []
        for context, gen_kwargs in [request.args for request in requests]:
            kwargs = dict(gen_kwargs)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            ids = generate_batch(self.model, [prompt], max_new, self.tokenizer.stop_ids, temperature)[0]
            text = self.tok_decode([t for t in ids if t not in self.tokenizer.stop_ids])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


def task_runner(
    tasks: Sequence[str], limit: int | None = None, include_path: str | Path | None = None
) -> Callable[[LLaMA, Any], dict[str, dict[str, Any]]]:
    """A function running the lm-eval `tasks` on a model, after checking that lm-eval knows every name."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        where = f" (nor in {include_path})" if include_path else ""
        raise ValueError(
            f"lm-eval does not know the task(s) {', '.join(unknown)}{where}; `lm_eval ls tasks` lists the known ones"
        )

    def run(model: LLaMA, tokenizer: Any) -> dict[str, dict[str, Any]]:
        out = simple_evaluate(
            model=LorafitLM(model=model, tokenizer=tokenizer),
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
        return {
            task: {
                key.removesuffix(",none"): value
                for key, value in metrics.items()
                if isinstance(value, (int, float)) and "stderr" not in key
            }
            for task, metrics in out["results"].items()
        }

    return run


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
