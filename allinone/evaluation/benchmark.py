"""`allinone bench`: every method on the same texts in one run, alternating per text, then the
chat timings; returns a report (the CLI prints it).

Methods: our scoring (the default), prompt-only and the original recipe (`seed`) on our engine,
plain one-pass scoring with the original prompt, and the baselines a user would otherwise run on
the original Q4_K_M file: transformers float32 + generate (the first recipe), plain
llama-cpp-python, and llama.cpp's own llama-server.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..conversation.history import Conversation
from ..machine import peak_rss_mb, rss_mb
from ..model.store import ModelError, resolve_model_path
from ..roles.choice import ChoiceRole
from ..service import Lane
from .bench import compare_methods
from .metrics import percentile
from .raw import stream_timing

CHAT_BENCH_TOKENS = 48
MULTI_ROLE = "score+roles"  # the sentiment with every other choice role that has a head


class BenchError(RuntimeError):
    """A baseline could not be loaded or started; the message says which and why."""


@dataclass
class BenchOptions:
    original: bool = True  # the original recipe (transformers float32), the slowest baseline
    original_model: str | None = None
    raw: bool = True  # plain llama-cpp-python
    llama_server: Path | None = None  # llama.cpp's server binary, for the peer
    peer_model: str | None = None


def spread_evenly(items: list, count: int) -> list:
    """`count` items spread over the list, so a quick run still covers every source and language."""
    return [items[i * len(items) // count] for i in range(count)] if 0 < count < len(items) else items


class Methods:
    """The methods timed side by side: name -> analyze(text), name -> reset() run untimed before."""

    def __init__(self):
        self.analyze: dict[str, Callable] = {}
        self.reset: dict[str, Callable] = {}
        self.original = self.raw = self.peer = None
        self.load_seconds: dict[str, float] = {}
        self.extra_roles: list[str] = []

    def add(self, name: str, analyze: Callable, reset: Callable | None = None) -> None:
        self.analyze[name] = analyze
        if reset is not None:
            self.reset[name] = reset

    def close(self) -> None:
        for baseline in (self.peer, self.raw):
            if baseline is not None:
                baseline.close()


def our_methods(assistant, methods: Methods) -> None:
    """Our scoring and its variants on the loaded model. The prompt-only and seed methods run on the
    model's own weights, without the head's adapter: the same prompt on the chat lane (idle until
    the chat part, alone in a llama.cpp context of its own), so no method empties another's cache.
    Not a lane of the shared plain context: another lane's cells there shift a lane's
    log-probabilities a little (docs/benchmarks.md), and the original-prompt analyst runs there."""
    settings = assistant.settings

    def analyst_on(engine, prompt_name: str, lane: int) -> ChoiceRole:
        return ChoiceRole(
            engine,
            assistant.mood,
            assistant.mood.prompt(prompt_name),
            lane=lane,
            max_text_chars=settings.max_text_chars,
            max_text_tokens=settings.max_text_tokens,
        )

    methods.add("score", assistant.analyze, assistant.analyst.warm_prefix)
    others = [
        role for role in assistant.roles.choice_roles() if role is not assistant.mood and assistant.role_head(role)
    ]
    if assistant.head is not None and others:
        # Every choice role with a head, on the one shared pass: what each extra role costs.
        roles = [assistant.mood, *others]
        methods.add(
            MULTI_ROLE,
            lambda text: assistant.analyze_roles(text, roles)[assistant.mood.name],
            assistant.analyst.warm_prefix,
        )
        methods.extra_roles = [role.name for role in others]
    own_weights = analyst_on(assistant.engine, settings.sentiment_prompt, Lane.CHAT)
    if assistant.head is not None:
        methods.add("prompt", own_weights.analyze, own_weights.warm_prefix)
    if settings.sentiment_prompt != "original":
        # Plain one-pass scoring with the original prompt: what the default must not be slower than.
        plain = analyst_on(assistant.engine, "original", Lane.SPARE)
        methods.add("original-prompt", plain.analyze, plain.warm_prefix)
    methods.add("seed", own_weights.analyze_by_generation, own_weights.warm_prefix)


def baseline_methods(assistant, options: BenchOptions, methods: Methods, announce: Callable[[str], None]) -> None:
    """The baselines, on the original Q4_K_M file unless told otherwise. The slow original recipe
    loads before the peer server starts, so that a failure cannot leave a server process behind."""
    settings = assistant.settings
    original_prompt = assistant.mood.prompt("original").template

    def model(chosen: str | None) -> Path:
        return Path(chosen) if chosen else resolve_model_path(settings.model, settings.resolved_home(), "q4_k_m")

    if options.original:
        from .original import OriginalRecipe

        try:
            recipe_model, started = model(options.original_model), time.perf_counter()
            announce(
                f"loading the original recipe's transformers float32 model from {recipe_model.name} "
                "(dequantising a GGUF takes a few minutes) ..."
            )
            methods.original = OriginalRecipe(recipe_model, original_prompt, settings)
            methods.load_seconds["original"] = time.perf_counter() - started
        except (OSError, ModelError, ImportError) as err:
            raise BenchError(f"cannot load the original recipe's model: {err}") from None
        methods.add("original", methods.original.analyze)
        # Our method without llama.cpp: one-pass scoring (the same prompt as `prompt`, the two
        # label tokens, prefix cache) on the recipe's own float32 model. No head: heads are
        # trained per model file, and this is the dequantised Q4_K_M.
        ours_fp32 = ChoiceRole(
            methods.original.engine,
            assistant.mood,
            assistant.mood.prompt(settings.sentiment_prompt),
            lane=0,
            max_text_chars=settings.max_text_chars,
            max_text_tokens=settings.max_text_tokens,
        )
        methods.add("prompt-transformers", lambda text: ours_fp32.analyze(text, use_head=False), ours_fp32.warm_prefix)
    if options.raw:
        from .raw import RawLlamaCpp

        try:
            started = time.perf_counter()
            methods.raw = RawLlamaCpp(
                model(None), original_prompt, threads=settings.threads, context_size=settings.context_size
            )
            methods.load_seconds["raw"] = time.perf_counter() - started
        except (OSError, ValueError, ModelError) as err:
            raise BenchError(f"cannot load llama-cpp-python's Llama on the original model: {err}") from None
        methods.add("raw-llama-cpp-python", methods.raw.analyze)
    if options.llama_server:
        from .peer import LlamaServerPeer

        try:
            methods.peer = LlamaServerPeer(
                Path(options.llama_server), model(options.peer_model), original_prompt, threads=settings.threads
            )
        except (OSError, RuntimeError, ModelError) as err:
            raise BenchError(f"cannot start the llama-server peer: {err}") from None
        methods.add("llama-server", methods.peer.analyze, methods.peer.warm_prefix)


def run_bench(
    assistant,
    items: list[dict],
    chat_messages: list[str],
    options: BenchOptions,
    progress: Callable[[str, int], Callable[[], None]] = lambda desc, total: lambda: None,
    announce: Callable[[str], None] = lambda message: None,
    rss_before_load: float | None = None,
) -> dict:
    """Time every method on `items` (labelled texts), then the chat flows on `chat_messages`.
    `progress(description, total)` returns a callback called once per item."""
    loaded = rss_mb()
    # The scoring part's own-weights rows borrow the chat lane: it runs the model's own weights
    # until the chat part puts the chat adapter back.
    chat_adapter = assistant.chat.adapter
    assistant.use_chat_adapter(None)
    methods = Methods()
    try:
        our_methods(assistant, methods)
        baseline_methods(assistant, options, methods, announce)
        results = compare_methods(
            items,
            methods.analyze,
            reset=methods.reset,
            progress=progress(f"bench ({', '.join(methods.analyze)})", len(items)),
        )
        if methods.peer:
            methods.peer.close()
            methods.peer = None
        assistant.use_chat_adapter(chat_adapter)
        chat = bench_chat(
            assistant,
            methods.raw,
            chat_messages,
            progress("bench (chat: respond flow, plain llama-cpp-python)", len(chat_messages)),
        )
    finally:
        methods.close()
    return summarize(assistant, items, results, methods, chat, rss_before_load, loaded)


def summarize(
    assistant, items, results: dict, methods: Methods, chat: dict | None, rss_before_load: float | None, loaded: float
) -> dict:
    p50 = {name: r["latency_ms"]["p50"] for name, r in results.items()}
    report = {
        "n": len(items),
        "engine": assistant.engine.description,
        "model": str(assistant.model_path),
        "head": assistant.head is not None,
        "load_seconds": round(assistant.load_seconds, 3),
        "rss_before_load_mb": None if rss_before_load is None else round(rss_before_load, 1),
        "rss_after_load_mb": round(loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "methods": results,
        "speedup_score_vs_seed": p50["seed"] / p50["score"],
    }
    if "prompt" in p50:
        report["head_latency_ratio"] = p50["score"] / p50["prompt"]
    if MULTI_ROLE in p50:
        report["extra_roles"] = methods.extra_roles
        # Each extra role's share of the sentiment's own p50 (the target: at most 0.25).
        report["extra_role_cost"] = (p50[MULTI_ROLE] - p50["score"]) / p50["score"] / len(methods.extra_roles)
    if "original-prompt" in p50:
        report["latency_ratio_vs_original_prompt"] = p50["score"] / p50["original-prompt"]
    if methods.original:
        report["original_model"] = methods.original.engine.description
        report["original_load_seconds"] = round(methods.load_seconds["original"], 1)
        report["speedup_vs_original"] = p50["original"] / p50["score"]
        report["speedup_prompt_transformers_vs_original"] = p50["original"] / p50["prompt-transformers"]
    if "llama-server" in p50:
        report["speedup_vs_llama_server"] = p50["llama-server"] / p50["score"]
    if methods.raw:
        report["raw_model"], report["raw_load_seconds"] = str(methods.raw.model), round(methods.load_seconds["raw"], 2)
        report["speedup_vs_raw_llama_cpp_python"] = p50["raw-llama-cpp-python"] / p50["score"]
    if chat:
        report["chat"] = chat
    return report


def bench_chat(assistant, raw, messages: list[str], progress: Callable[[], None]) -> dict | None:
    """Chat timings, each message a new conversation: our respond flow (sentiment, then the reply);
    when it shares one prefill for both roles, also the same flow with two passes (the analyst's,
    then the chat lane's); with a chat adapter, also the flow on the model's own weights (what the
    adapter costs); the flows alternate in order per message. Unless `raw` is None, plain
    llama-cpp-python streams a reply to the very same chat prompt. Greedy, CHAT_BENCH_TOKENS
    tokens each; before each of our runs the chat lane holds just the prompt's
    fixed beginning, as it would for any new conversation."""
    if not messages:
        return None
    # Every flow decodes exactly CHAT_BENCH_TOKENS tokens (the end of the reply is held off), so
    # that decode rates compare like with like: the adapted and the plain model reply at different
    # lengths, and a short reply's rate is mostly its first steps.
    sampling = dataclasses.replace(
        assistant.default_sampling(), max_tokens=CHAT_BENCH_TOKENS, min_tokens=CHAT_BENCH_TOKENS
    )
    shared = assistant.chat_head is not None
    adapter = assistant.chat.adapter
    flows = ["ours", "two_passes"] if shared else ["ours"]
    if adapter is not None:
        flows.append("own_weights")
    timings = {flow: {"sentiment": [], "first": [], "rates": []} for flow in flows}
    theirs = {"first": [], "rates": []}

    def run(flow: str, message: str) -> str:
        weights = None if flow == "own_weights" else adapter
        if assistant.chat.adapter != weights:  # empties the chat lane: the prefix is warmed again below
            assistant.use_chat_adapter(weights)
        assistant.chat.warm_prefix()
        start = time.perf_counter()
        response = assistant.respond(Conversation(), message, sampling=sampling, shared_prefill=flow != "two_passes")
        timings[flow]["sentiment"].append((time.perf_counter() - start) * 1000)
        first = None
        for _ in response:
            if first is None:
                first = time.perf_counter()
        timing = stream_timing(start, first, time.perf_counter(), response.stats.completion_tokens)
        timings[flow]["first"].append(timing.first_token_ms)
        timings[flow]["rates"].append(timing.decode_tokens_per_s)
        return response.sentiment.label

    # The chat roles' pass (emotion, intent) comes once per reply, after its first token: timed on
    # its own below, and kept out of the flows' decode rates, which the peer's have no pass in.
    settings = assistant.settings
    chat_roles_ms = []
    for index, message in enumerate(messages):
        assistant.settings = settings.model_copy(update={"chat_roles": ""})
        try:
            labels = {flow: run(flow, message) for flow in (flows if index % 2 == 0 else flows[::-1])}
        finally:
            assistant.settings = settings
        if assistant.chat_roles():
            start = time.perf_counter()
            assistant.annotate(message)
            chat_roles_ms.append((time.perf_counter() - start) * 1000)
        if raw:
            timing = raw.chat(assistant.chat.text_messages([], message, labels["ours"]), CHAT_BENCH_TOKENS)
            theirs["first"].append(timing.first_token_ms)
            theirs["rates"].append(timing.decode_tokens_per_s)
        progress()
    assistant.use_chat_adapter(adapter)
    summary = {
        flow: {
            "sentiment_ms_p50": _median(t["sentiment"]),
            "first_token_ms_p50": _median(t["first"]),
            "decode_tokens_per_s": _median(t["rates"]),
        }
        for flow, t in timings.items()
    }
    summary["ours"]["shared_prefill"] = shared
    if adapter is not None:
        own = summary["own_weights"]
        summary["ours"]["chat_adapter"] = adapter.path.name
        summary["adapter_cost"] = {
            "sentiment_ms_ratio": summary["ours"]["sentiment_ms_p50"] / own["sentiment_ms_p50"],
            "first_token_ms_ratio": summary["ours"]["first_token_ms_p50"] / own["first_token_ms_p50"],
            "decode_tokens_per_s_ratio": summary["ours"]["decode_tokens_per_s"] / own["decode_tokens_per_s"],
        }
        # The same three, message by message (both flows ran it back to back), then the median:
        # a long message is slow in both flows and the machine's drift hits both alike, which a
        # ratio of two medians does not cancel.
        paired = {
            "sentiment_ms_ratio": "sentiment",
            "first_token_ms_ratio": "first",
            "decode_tokens_per_s_ratio": "rates",
        }
        summary["adapter_cost_paired"] = {
            name: _median([a / b for a, b in zip(timings["ours"][key], timings["own_weights"][key], strict=True)])
            for name, key in paired.items()
        }
    return {
        "n": len(messages),
        "max_tokens": CHAT_BENCH_TOKENS,
        **summary,
        # one pause per reply, after its first token (settings.chat_roles: emotion, intent)
        "chat_roles_ms_p50": _median(chat_roles_ms) if chat_roles_ms else None,
        "raw_llama_cpp_python": {
            "first_token_ms_p50": _median(theirs["first"]),
            "decode_tokens_per_s": _median(theirs["rates"]),
        }
        if raw
        else None,
    }


def _median(values: list[float]) -> float:
    return percentile(values, 50)
