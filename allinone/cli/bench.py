"""`bench`: the same-run comparison (evaluation/benchmark.py runs it; this prints it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..settings import Settings
from .common import EXIT_FAILURE, CliError, load_assistant, progress_bar, warn

DEFAULT_TEXTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sentiment-dev.jsonl"
DEFAULT_CHAT_MESSAGES = DEFAULT_TEXTS.with_name("chat-dev.jsonl")
QUICK_TEXTS = 60
QUICK_CHAT_MESSAGES = 10


def cmd_bench(args, settings: Settings) -> int:
    from ..evaluation.benchmark import BenchError, BenchOptions, run_bench, spread_evenly
    from ..evaluation.data import DataError, load_labelled, read_jsonl
    from ..machine import rss_mb
    from ..service import discover_roles, mood_role

    texts = Path(args.texts) if args.texts else DEFAULT_TEXTS
    try:
        items = load_labelled(texts, labels=mood_role(discover_roles(settings)).label_names)
    except DataError as err:
        raise CliError(f"{err} (choose the texts with --texts FILE)") from None
    items = spread_evenly(items, args.limit or (QUICK_TEXTS if args.quick else 0))
    chat_path = Path(args.chat_messages) if args.chat_messages else DEFAULT_CHAT_MESSAGES
    messages = []
    if chat_path.is_file():
        try:
            messages = [obj["message"] for _, obj in read_jsonl(chat_path, field="message")]
        except DataError as err:
            raise CliError(str(err)) from None
        messages = spread_evenly(messages, args.limit or (QUICK_CHAT_MESSAGES if args.quick else 0))
    else:
        warn(f"no chat messages at {chat_path}: chat timings skipped (--chat-messages FILE)")
    if not args.llama_server:
        warn("no --llama-server given: the llama.cpp server peer is skipped (build one with `make llama-server`)")
    options = BenchOptions(
        original=not args.no_original,
        original_model=args.original_model,
        raw=not args.no_raw,
        llama_server=Path(args.llama_server) if args.llama_server else None,
        peer_model=args.peer_model,
    )
    before = rss_mb()
    assistant = load_assistant(settings)
    bars = []

    def progress(description: str, total: int):
        bars.append(progress_bar(total=total, desc=description, disable=args.quiet))
        return lambda: bars[-1].update(1)

    try:
        report = run_bench(
            assistant,
            items,
            messages,
            options,
            progress=progress,
            rss_before_load=before,
            announce=lambda message: print(message, file=sys.stderr),
        )
    except BenchError as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    finally:
        for bar in bars:
            bar.close()
    report["texts"] = str(texts)
    if args.plot:
        from ..evaluation.metrics import draw_latencies

        draw_latencies(
            report["methods"],
            args.plot,
            title=f"{len(items)} texts from {texts.name}, one at a time, same run\nours: {assistant.model_path.name}",
        )
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    return 0


MULTI_ROLE_NOTE = "score+roles: the sentiment and every other choice role with a head, on one pass"


def format_report(report: dict) -> str:
    lines = [
        f"{report['n']} texts from {report['texts']}; {report['engine']}",
        f"model load {report['load_seconds']:.2f} s; RSS {report['rss_after_load_mb']:.0f} MB after load, "
        f"peak {report['peak_rss_mb']:.0f} MB",
        "| method | accuracy | p50 ms | p95 ms |\n|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['latency_ms']['p50']:.0f} | {r['latency_ms']['p95']:.0f} |")
    lines.append(f"score is {report['speedup_score_vs_seed']:.1f}x faster than seed (median latency, same run)")
    if "extra_role_cost" in report:
        lines.append(
            f"{MULTI_ROLE_NOTE}: each extra role ({', '.join(report['extra_roles'])}) costs "
            f"{report['extra_role_cost']:.1%} of the sentiment's own p50"
        )
    if "speedup_vs_original" in report:
        lines.append(
            f"score is {report['speedup_vs_original']:.1f}x faster than the original recipe (transformers "
            f"float32, generate(max_new_tokens=10)); its model took {report['original_load_seconds']:.0f} s "
            f"to load; on that same float32 model, one-pass scoring alone (prompt-transformers) is "
            f"{report['speedup_prompt_transformers_vs_original']:.1f}x faster than the recipe"
        )
    if "speedup_vs_llama_server" in report:
        lines.append(f"score is {report['speedup_vs_llama_server']:.2f}x faster than llama-server")
    if "speedup_vs_raw_llama_cpp_python" in report:
        lines.append(
            f"score is {report['speedup_vs_raw_llama_cpp_python']:.1f}x faster than plain llama-cpp-python "
            f"(create_completion, 10 tokens) on {Path(report['raw_model']).name}"
        )
    if report.get("chat"):
        lines += format_chat(report["chat"])
    return "\n".join(lines)


def format_chat(chat: dict) -> list[str]:
    def flow(timing: dict) -> str:
        return (
            f"sentiment after {timing['sentiment_ms_p50']:.0f} ms, first reply token after "
            f"{timing['first_token_ms_p50']:.0f} ms, {timing['decode_tokens_per_s']:.1f} tokens/s"
        )

    ours, theirs = chat["ours"], chat["raw_llama_cpp_python"]
    lines = [
        f"chat, {chat['n']} messages: respond flow: {flow(ours)}"
        + (
            f"; plain llama-cpp-python on the same chat prompt: first token after "
            f"{theirs['first_token_ms_p50']:.0f} ms, {theirs['decode_tokens_per_s']:.1f} tokens/s"
            if theirs
            else ""
        )
    ]
    if "own_weights" in chat:
        cost, paired = chat["adapter_cost"], chat["adapter_cost_paired"]
        lines.append(
            f"the same flow without the chat adapter (the model's own weights): {flow(chat['own_weights'])}; "
            f"with/without: sentiment {cost['sentiment_ms_ratio']:.2f}, first token "
            f"{cost['first_token_ms_ratio']:.2f}, tokens/s {cost['decode_tokens_per_s_ratio']:.2f} "
            f"(message by message, median: {paired['sentiment_ms_ratio']:.2f}, "
            f"{paired['first_token_ms_ratio']:.2f}, {paired['decode_tokens_per_s_ratio']:.2f})"
        )
    if "two_passes" in chat:
        lines.append(
            f"the same flow with two passes over the message (analyst, then chat lane): {flow(chat['two_passes'])}"
        )
    if chat.get("chat_roles_ms_p50") is not None:
        lines.append(
            f"the message's chat roles (emotion, intent), once per reply after its first token: "
            f"{chat['chat_roles_ms_p50']:.0f} ms"
        )
    return lines


def register(command) -> None:
    p = command(
        "bench",
        cmd_bench,
        "Time one-pass scoring against prompt-only scoring, the original recipe "
        "(seed) and optionally llama.cpp's server, on the same texts in one run; "
        "model load time and memory.",
    )
    p.add_argument("--texts", metavar="FILE", help=f"labelled JSONL (default: {DEFAULT_TEXTS})")
    p.add_argument("--limit", type=int, default=0, help="N texts, spread evenly over the file")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TEXTS} texts (unless --limit)")
    p.add_argument(
        "--llama-server",
        metavar="PATH",
        help="also time llama.cpp's llama-server binary (`make llama-server` builds one) as a peer",
    )
    p.add_argument(
        "--peer-model", metavar="GGUF", help="the peer's model (default: the original Q4_K_M default model, or --model)"
    )
    p.add_argument(
        "--no-original",
        action="store_true",
        help="skip the original recipe (transformers float32 + generate), the slowest baseline",
    )
    p.add_argument(
        "--original-model",
        metavar="PATH",
        help="the original recipe's model: a Hugging Face directory or GGUF (default: the "
        "original Q4_K_M default model, dequantised to float32)",
    )
    p.add_argument(
        "--no-raw",
        action="store_true",
        help="skip plain llama-cpp-python (create_completion, create_chat_completion) on the original model",
    )
    p.add_argument(
        "--chat-messages",
        metavar="FILE",
        help=f"messages for the chat / respond-flow timings (default: {DEFAULT_CHAT_MESSAGES.name} "
        f"beside the texts; {QUICK_CHAT_MESSAGES} of them with --quick)",
    )
    p.add_argument("--plot", metavar="PNG", help="draw the latency of every method as a bar chart")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
