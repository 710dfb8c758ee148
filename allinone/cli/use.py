"""`analyze`, `chat`, `batch`, `serve`: the assistant at work."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from ..settings import Settings
from .common import CliError, load_assistant, progress_bar, texts_from, warn


def resolve_roles(spec: str, registry) -> list:
    """`--roles sentiment,emotion,./mine.json`: role names, or role files used as given."""
    from ..roles.definition import RoleError, load_role_file

    roles = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        try:
            path = Path(item)
            looks_like_path = item.endswith(".json") or "/" in item
            roles.append(load_role_file(path) if looks_like_path else registry.get(item))
        except RoleError as err:
            raise CliError(str(err)) from None
    if not roles:
        raise CliError("--roles names no role")
    return roles


def choice_line(choice, role) -> str:
    if role.kind == "extract":
        return f"🔑 {', '.join(choice.phrases[:5]) or '-'}"
    found = role.label(choice.label)
    prob = f" {choice.probability:.2f}" if choice.probability is not None else ""
    return f"{found.emoji} {found.shown('zh')}{prob}".strip()


def cmd_analyze(args, settings: Settings) -> int:
    from ..roles.definition import RoleError
    from ..roles.inputs import InputError, validate_text

    texts = texts_from(args)
    if not texts:
        raise CliError("no text given (pass TEXT arguments or lines on stdin)")
    for text in texts:  # reject bad input before paying for the model load
        try:
            validate_text(text, settings.max_text_chars)
        except InputError as err:
            raise CliError(str(err)) from None
    if args.roles and args.method != "score":
        raise CliError("--roles scores every role by its head or its prompt: --method applies to sentiment alone")
    assistant = load_assistant(settings)
    roles = resolve_roles(args.roles, assistant.roles) if args.roles else None
    if roles:
        for text in texts:
            try:
                results = assistant.analyze_roles(text, roles)
            except (InputError, RoleError) as err:
                raise CliError(str(err)) from None
            if args.json:
                row = {"text": text, "roles": {name: choice.to_dict() for name, choice in results.items()}}
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                shown = " · ".join(choice_line(results[r.name], r) for r in roles)
                slowest = max(choice.latency_ms for choice in results.values())
                print(f"{shown}  {slowest:.0f} ms  {text}", flush=True)
        return 0
    for text in texts:
        result = assistant.analyze(text, method=args.method)
        if result.truncated:
            warn(
                f"text of {len(text)} characters was cut to its first and last "
                f"{assistant.analyst.max_text_tokens // 2} tokens"
            )
        if args.json:
            row = {"text": text, **result.to_dict()}
            row.pop("probabilities")  # two labels: `probability` says it all (--roles gives every label's)
            if not result.truncated:
                row.pop("truncated")
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            shown = assistant.mood.label(result.label)
            prob = f" ({result.probability:.2f})" if result.probability is not None else ""
            print(f"{shown.emoji} {shown.shown('en')}{prob}  {result.latency_ms:.0f} ms  {text}", flush=True)
    return 0


def cmd_chat(args, settings: Settings) -> int:
    from ..conversation.history import Conversation
    from ..roles.inputs import InputError

    assistant = load_assistant(settings)
    conversation = Conversation()
    print(
        f"allinone chat on {assistant.model_path.name} ({assistant.load_seconds:.1f} s to load). "
        "/reset starts over, /exit quits, Ctrl-C stops a reply.",
        file=sys.stderr,
    )
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
        print(assistant.mood.shown(response.sentiment.label), flush=True)
        try:
            deltas = iter(response)
            # The other roles are known once the reply has begun: their line goes under the
            # sentiment's, before the reply (which a terminal cannot print around).
            held = list(itertools.islice(deltas, 2))
            if response.annotations:
                labels = {name: choice.label for name, choice in response.annotations.items()}
                print(assistant.annotation_line(labels), flush=True)
            for delta in itertools.chain(held, deltas):
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            response.close()
            print(" [stopped]", end="")
        print(flush=True)


def cmd_batch(args, settings: Settings) -> int:
    from ..evaluation.data import DataError
    from .batch import completed_lines, read_batch_input, run_batch

    in_path, out_path = Path(args.input), Path(args.output)
    if in_path.resolve() == out_path.resolve():
        raise CliError("the output file must differ from the input file")
    if in_path.is_dir():
        return batch_shards_on_ray(args, settings, in_path, out_path)
    try:
        items = read_batch_input(in_path)
        done = completed_lines(out_path, items)  # an output of another input is refused before the model loads
        recipe = batch_recipe(args, settings)
        if args.ray is None:
            label = recipe(load=load_assistant) if done < len(items) else None
            summary = run_batch(items, out_path, lambda todo: map(label, todo), progress_factory=progress_bar)
        else:
            summary = batch_on_ray(args, recipe, items, out_path)
    except DataError as err:
        raise CliError(str(err)) from None
    print(
        f"{summary['written']} labelled, {summary['skipped']} already done, {summary['total']} in all -> {out_path}",
        file=sys.stderr,
    )
    return 0


def batch_recipe(args, settings: Settings):
    """How each line is answered (the sentiment, or --roles), as a recipe a Ray actor can carry."""
    from ..roles.definition import RoleError
    from ..service import discover_roles
    from .batch import AssistantLabeller

    try:
        roles = resolve_roles(args.roles, discover_roles(settings)) if args.roles else None
    except RoleError as err:
        raise CliError(str(err)) from None
    return AssistantLabeller(settings, roles)


def check_actors(args) -> None:
    if args.actors < 1 or args.threads_per_actor < 1:
        raise CliError("--actors and --threads-per-actor must be at least 1")


def batch_shards_on_ray(args, settings: Settings, in_dir: Path, out_dir: Path) -> int:
    """IN_DIR/*.jsonl -> OUT_DIR/: Ray Data reads and the driver streams, for inputs larger than
    its memory."""
    from ..scale.cluster import ClusterError, ray_session
    from ..scale.ray_batch import label_shards_on_ray

    if args.ray is None:
        raise CliError(f"{in_dir} is a directory: a directory of *.jsonl shards is labelled on Ray (add --ray)")
    if not any(in_dir.glob("*.jsonl")):
        raise CliError(f"{in_dir} has no *.jsonl shards")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"{out_dir} is a file: with a directory of shards in, -o names a directory")
    check_actors(args)
    recipe = batch_recipe(args, settings)
    try:
        with ray_session(args.ray or None, args.actors * args.threads_per_actor) as ray:
            bar = progress_bar()
            summary = label_shards_on_ray(
                ray, in_dir, out_dir, recipe, actors=args.actors, threads_per_actor=args.threads_per_actor, progress=bar
            )
            bar.close()
    except ClusterError as err:
        raise CliError(str(err)) from None
    print(
        f"{summary['written']} lines labelled in {summary['shards'] - summary['skipped_shards']} shards, "
        f"{summary['skipped_shards']} shards already done -> {out_dir}",
        file=sys.stderr,
    )
    return 0


def batch_on_ray(args, recipe, items: list[dict], out_path: Path) -> dict:
    from ..scale.cluster import ClusterError, ray_session
    from ..scale.ray_batch import label_on_ray
    from .batch import run_batch

    check_actors(args)
    try:
        with ray_session(args.ray or None, args.actors * args.threads_per_actor) as ray:
            return run_batch(
                items,
                out_path,
                lambda todo: label_on_ray(
                    ray, todo, recipe, actors=args.actors, threads_per_actor=args.threads_per_actor
                ),
                progress_factory=progress_bar,
            )
    except ClusterError as err:
        raise CliError(str(err)) from None


def cmd_serve(args, settings: Settings) -> int:
    from ..conversation.store import StoreError
    from ..server.app import check_bind, open_store, serve

    try:  # before paying for the model load
        check_bind(settings)
        store = open_store(settings)
    except (ValueError, StoreError) as err:
        raise CliError(str(err)) from None
    if args.ray is not None:
        store.close()  # each replica opens its own
        return serve_on_ray(args, settings)
    assistant = load_assistant(settings)
    print(
        f"allinone serving {assistant.model_path.name} ({assistant.load_seconds:.1f} s to load) on "
        f"http://{settings.host}:{settings.port}/",
        file=sys.stderr,
        flush=True,
    )
    serve(assistant, settings, store=store)
    return 0


def serve_on_ray(args, settings: Settings) -> int:
    import os

    from ..scale.cluster import ClusterError, ray_session
    from ..scale.ray_serve import run

    autoscale = None
    if args.autoscale:
        try:
            low, high = (int(part) for part in args.autoscale.split(","))
        except ValueError:
            raise CliError(f"--autoscale MIN,MAX: two whole numbers, got {args.autoscale!r}") from None
        if not 1 <= low <= high:
            raise CliError("--autoscale MIN,MAX needs 1 <= MIN <= MAX")
        autoscale = (low, high)
    replicas = None if autoscale else args.replicas
    if replicas is not None and replicas < 1:
        raise CliError("--replicas must be at least 1")
    most = autoscale[1] if autoscale else replicas
    threads = args.threads_per_replica or max(1, (os.cpu_count() or 1) // most)
    settings = settings.model_copy(update={"threads": threads})
    try:
        with ray_session(args.ray or None, most * threads) as ray:
            run(ray, settings, replicas=replicas, autoscale=autoscale)
    except ClusterError as err:
        raise CliError(str(err)) from None
    return 0


def register(command) -> None:
    p = command("analyze", cmd_analyze, "Sentiment (or other roles) of each TEXT (or of each stdin line).")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument(
        "--roles",
        metavar="ROLE,...",
        help="choice roles to answer, comma-separated: names (see `allinone roles`) or role files "
        "(a path ending in .json); the roles with a learned head share one pass over the text",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--method",
        choices=["score", "prompt", "seed"],
        default="score",
        help="score: one forward pass, decided by the learned head when there is one, else by the "
        "two label tokens (default); prompt: the two label tokens even with a head; "
        "seed: the original recipe, 10 generated tokens + substring test",
    )
    command("chat", cmd_chat, "Interactive chat: sentiment of each line at once, then the streamed reply.")
    p = command("batch", cmd_batch, "Label every JSONL line's `text`; resumable after an interruption.")
    p.add_argument("input", metavar="IN.jsonl", help="a JSONL file, or with --ray a directory of *.jsonl shards")
    p.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="a file, or a directory for shards")
    p.add_argument(
        "--roles",
        metavar="ROLE,...",
        help="choice roles to answer (as in analyze): each line gets `roles` {name: {label, probability}} "
        "instead of `label` and `probability`",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="label on Ray Data, one model per actor: join the cluster at ADDRESS (HOST:PORT), or without "
        "ADDRESS start a local Ray on loopback for this command (needs the scale extra)",
    )
    p.add_argument("--actors", type=int, default=2, metavar="N", help="with --ray: actors, each with its own model")
    p.add_argument(
        "--threads-per-actor",
        type=int,
        default=1,
        metavar="T",
        help="with --ray: CPUs each actor reserves, and its llama.cpp threads",
    )
    p = command(
        "serve",
        cmd_serve,
        "HTTP API (sentiment, respond, OpenAI-compatible chat completions) and the "
        "web page, on one model; loopback unless an API key is set.",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run as Ray Serve replicas (one model each) behind Serve's proxy on the same host, port and "
        "routes: join the cluster at ADDRESS (HOST:PORT) or start a local Ray (needs the scale extra); "
        "sessions are shared through --session-db (postgresql://… across machines)",
    )
    p.add_argument("--replicas", type=int, default=2, metavar="N", help="with --ray: replicas (default 2)")
    p.add_argument(
        "--autoscale",
        metavar="MIN,MAX",
        help="with --ray: between MIN and MAX replicas, by load (instead of --replicas)",
    )
    p.add_argument(
        "--threads-per-replica",
        type=int,
        metavar="T",
        help="with --ray: CPUs each replica reserves and its llama.cpp threads (default: cores / replicas)",
    )
