"""`eval`, `train-head`, `eval-chat`: how good the roles are, and teaching the sentiment heads."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..machine import peak_rss_mb
from ..settings import Settings
from .common import CliError, load_assistant, progress_bar, warn


def cmd_eval(args, settings: Settings) -> int:
    if args.labels:
        return _eval_label_sets(args, settings)
    if args.train:
        raise CliError("--train goes with --labels (a head per source of the manifest)")
    from ..evaluation.data import DataError, load_labelled
    from ..evaluation.metrics import calibration, draw_reliability, summarize
    from ..roles.definition import RoleError
    from ..service import discover_roles, mood_role

    try:
        registry = discover_roles(settings)
        role = registry.get(args.role) if args.role else mood_role(registry)
        if role.kind == "extract":
            return _eval_extract(args, settings, role)
        if role.kind != "choice":
            raise CliError(
                f"role {role.name!r} is a {role.kind} role: eval takes choice and extract roles "
                "(eval-chat judges replies)"
            )
        if args.out:
            raise CliError("--out writes an extract role's phrases; a choice role's labels go through `batch`")
        items = load_labelled(args.data, labels=role.label_names)
    except (DataError, RoleError) as err:
        raise CliError(str(err)) from None
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise CliError(f"{args.data} has no labelled texts")
    assistant = load_assistant(settings)
    is_mood = role.name == assistant.mood.name
    if not is_mood and args.method != "score":
        raise CliError(
            f"--method {args.method} is the sentiment analyst's; role {role.name!r} is scored by its head or prompt"
        )
    if args.method == "chat" and assistant.chat_head is None:
        raise CliError(
            f"no chat head for this model, the {settings.chat_prompt!r} chat prompt and the chat lane's "
            "weights: the respond flow asks the analyst (train one with `train-head --role chat`)"
        )
    predictions, latencies, probabilities = [], [], []
    started = time.perf_counter()
    head = (
        {"score": assistant.head, "chat": assistant.chat_head}.get(args.method)
        if is_mood
        else assistant.role_head(role)
    )
    with progress_bar(total=len(items), desc=f"eval {role.name} ({args.method})", disable=args.quiet) as bar:
        for item in items:
            if is_mood:
                result = assistant.analyze(item["text"], method=args.method)
            else:
                result = assistant.analyze_roles(item["text"], [role])[role.name]
            predictions.append(result.label)
            latencies.append(result.latency_ms)
            probabilities.append(result.probability)
            bar.update(1)
    report = summarize(items, predictions, latencies)
    if None not in probabilities:
        correct = [p == item["label"] for p, item in zip(predictions, items, strict=True)]
        report["calibration"] = calibration(probabilities, correct)
        if args.plot:
            draw_reliability(
                report["calibration"],
                args.plot,
                title=f"{Path(args.data).name}: {role.name} {args.method}, {assistant.model_path.name}",
            )
    elif args.plot:
        warn("the seed method gives no probabilities: no reliability diagram")
    report.update(
        {
            "role": role.name,
            "method": args.method if is_mood else ("head" if head else "prompt"),
            "sentiment_prompt": settings.sentiment_prompt,
            "head": (str(head.info.get("source") or "packaged") if head else None),
        }
    )
    _finish_report(report, assistant, started, args.json)
    return 0


def _eval_extract(args, settings: Settings, role) -> int:
    """eval DATA --role keywords: F1@5 / F1@10 on the present key phrases, per language, as
    keywords-README.md defines them; --out writes each text's phrases."""
    from ..evaluation.data import DataError, load_phrased
    from ..evaluation.keywords import summarize
    from ..evaluation.metrics import percentile

    if args.method != "score" or args.plot:
        raise CliError(f"role {role.name!r} returns phrases: no --method or --plot for it")
    try:
        rows = load_phrased(args.data)
    except DataError as err:
        raise CliError(str(err)) from None
    if args.cut:
        # Texts of one length, for the latency a user sees at that length: the longer texts cut,
        # the gold that still occurs in the cut kept (the scorer decides that from `keywords`).
        rows = [
            {**row, "text": row["text"][: args.cut], "present_keywords": None}
            for row in rows
            if len(row["text"]) >= args.cut
        ]
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise CliError(f"{args.data} has no texts" + (f" of {args.cut} characters or more" if args.cut else ""))
    assistant = load_assistant(settings)
    extractor = assistant.extract_role(role)
    started = time.perf_counter()
    answers, latencies = {}, []
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    try:
        with progress_bar(total=len(rows), desc=f"eval {role.name}", disable=args.quiet) as bar:
            for row in rows:
                result = assistant.analyze_roles(row["text"], [role])[role.name]
                answers[row["id"]] = result.phrases
                latencies.append(result.latency_ms)
                if out:
                    out.write(json.dumps({"id": row["id"], "keywords": result.phrases}, ensure_ascii=False) + "\n")
                bar.update(1)
    finally:
        if out:
            out.close()
    report = summarize(rows, answers)
    for lang, group in report["by_lang"].items():
        ms = [latency for row, latency in zip(rows, latencies, strict=True) if row["lang"] == lang]
        group["latency_ms"] = {"p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1)}
    report.update(
        {
            "cut": args.cut or None,
            "role": role.name,
            "method": "head" if extractor.head is not None else "counts",
            "head": str(extractor.head.info.get("source") or "packaged") if extractor.head else None,
            "latency_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1)},
        }
    )
    _finish_report(report, assistant, started, args.json)
    return 0


def _finish_report(report: dict, assistant, started: float, as_json: bool) -> None:
    from ..evaluation.metrics import format_report

    report.update(
        {
            "model": str(assistant.model_path),
            "engine": assistant.engine.description,
            "load_seconds": round(assistant.load_seconds, 3),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    )
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
        return
    if "confusion" in report:
        print(format_report(report))
    elif "f1@5" in report:
        print(
            f"n = {report['n']}   F1@5 = {report['f1@5']:.3f}   F1@10 = {report['f1@10']:.3f}   "
            f"latency p50 = {report['latency_ms']['p50']:.0f} ms, p95 = {report['latency_ms']['p95']:.0f} ms "
            f"({report['method']})"
        )
        for lang, g in report["by_lang"].items():
            print(
                f"  {lang:<4} n={g['n']:<4} F1@5={g['f1@5']:.3f} F1@10={g['f1@10']:.3f} P@5={g['p@5']:.3f}  "
                f"p50 {g['latency_ms']['p50']:.0f} ms"
            )
    else:
        print(
            f"n = {report['n']}   accuracy = {report['accuracy']:.3f}   macro F1 = {report['macro_f1']:.3f}   "
            f"latency p50 = {report['latency_ms']['p50']:.0f} ms, p95 = {report['latency_ms']['p95']:.0f} ms"
        )
        for key in ("by_lang", "by_source"):
            print(f"{key[3:]}:")
            for name, g in report[key].items():
                print(f"  {name:<36} n={g['n']:<4} accuracy={g['accuracy']:.3f} macro F1={g['macro_f1']:.3f}")
    if "calibration" in report:
        print(f"expected calibration error (10 bins): {report['calibration']['ece']:.3f}")
    print(f"model load {report['load_seconds']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB")


def _eval_label_sets(args, settings: Settings) -> int:
    """eval DATA --labels MANIFEST [--train TRAIN]: each row against its own source's labels."""
    from ..evaluation.data import DataError
    from ..evaluation.labelsets import heads_for_sources, load_manifest, load_rows, report
    from ..roles.head import HeadError

    if args.role or args.method != "score":
        raise CliError("--labels makes a role per source of the manifest: no --role or --method with it")
    try:
        roles = load_manifest(args.labels)
        rows = load_rows(args.data, roles)
        train_rows = load_rows(args.train, roles) if args.train else []
    except DataError as err:
        raise CliError(str(err)) from None
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise CliError(f"{args.data} has no labelled texts")
    assistant = load_assistant(settings)
    heads = {}
    if train_rows:
        with progress_bar(total=len(train_rows), desc="heads per source", disable=args.quiet) as bar:
            try:
                heads = heads_for_sources(assistant, roles, train_rows, bar.update, announce=bar.write)
            except (DataError, HeadError) as err:
                raise CliError(str(err)) from None
    started = time.perf_counter()
    predicted, latencies = [""] * len(rows), [0.0] * len(rows)
    # Source by source: a role scored by its prompt keeps that prompt cached while its rows pass.
    order = sorted(range(len(rows)), key=lambda i: rows[i]["source"])
    with progress_bar(total=len(rows), desc=f"eval ({'heads' if heads else 'zero-shot'})", disable=args.quiet) as bar:
        for i in order:
            row = rows[i]
            role = roles[row["source"]]
            head = {role.name: heads[row["source"]]} if row["source"] in heads else None
            choice = assistant.analyze_roles(row["text"], [role], heads=head)[role.name]
            predicted[i], latencies[i] = choice.label, choice.latency_ms
            bar.update(1)
    result = report(rows, predicted, latencies)
    result.update(
        {
            "labels": str(args.labels),
            "method": "head" if heads else "zero-shot",
            "train": str(args.train) if args.train else None,
        }
    )
    _finish_report(result, assistant, started, args.json)
    return 0


def cmd_train_head(args, settings: Settings) -> int:
    from ..evaluation.data import DataError, load_labelled, parse_label_map
    from ..roles.definition import RoleError
    from ..roles.head import HeadError, check_training_labels, heldout_count, train_head
    from ..service import CHAT_ROLE, discover_roles, mood_role

    try:
        registry = discover_roles(settings)
        mood = mood_role(registry)
        # `--role chat`: the mood, read on the chat lane's pass (the respond flow's shared prefill).
        role = mood if args.role in (None, CHAT_ROLE) else registry.get(args.role)
        if role.kind == "extract":
            return _train_phrase_head(args, settings, role)
        if role.kind != "choice":
            raise CliError(f"role {role.name!r} is a {role.kind} role: heads are for choice and extract roles")
        if args.data:
            label_map = parse_label_map(args.label_map, role.label_names) if args.label_map else None
            items = load_labelled(*args.data, labels=role.label_names, label_map=label_map)
        elif args.label_map:
            raise CliError("--label-map renames the labels of DATA files: give them")
        else:
            items = [{"text": e.text, "label": e.label} for e in role.examples]
            if not items:
                raise CliError(f"role {role.name!r} has no examples: give DATA.jsonl files to learn from")
        check_training_labels([item["label"] for item in items], role.label_names)
    except (DataError, HeadError, RoleError) as err:
        raise CliError(str(err)) from None
    if not 0.05 <= args.holdout <= 0.5:
        raise CliError("--holdout must be between 0.05 and 0.5")
    on_chat_lane = args.role == CHAT_ROLE
    # The mood's own head is trained on the model's own weights; the other roles' heads read the
    # analysis pass as it runs, with the mood head's adapter.
    own_head = role is mood and not on_chat_lane
    assistant = load_assistant(
        settings.model_copy(update={"sentiment_head": False}) if own_head else settings,
        chat_lane_reads_hidden_states=on_chat_lane,
    )
    sha = assistant.model_sha256()
    if sha is None:
        raise CliError("a head is keyed by the model file's sha256: train it on a GGUF model")
    if on_chat_lane and not assistant.chat.prompt.mood_follows_message:
        raise CliError(
            f"the {settings.chat_prompt!r} chat prompt puts the mood tag before the message: "
            "no head can read the message's mood before the tag is chosen"
        )
    layers = args.layers
    if on_chat_lane:
        point = assistant.chat.reading_point()
        # The respond flow's pass runs every block anyway, so reading high up costs nothing there
        # (docs/accuracy.md has the sweep over depths).
        layers = assistant.engine.n_layers - 1 if layers is None else layers
    elif own_head:
        point = assistant.analyst.reading_point()
    else:
        if assistant.head is None:
            raise CliError("heads of other roles read the analysis pass, which needs the sentiment head")
        point = assistant.analysis_point()
        if layers not in (None, assistant.head.layers):
            raise CliError(f"heads on the analysis pass read where it stops, after block {assistant.head.layers}")
        layers = assistant.head.layers
    labels = [item["label"] for item in items]
    total = len(items) + (heldout_count(labels, args.holdout) if point.prompt_alone else 0)
    with progress_bar(
        total=total,
        desc=f"train-head {role.name}@{point.key} (hidden states"
        + (", then held-out prompt scores)" if point.prompt_alone else ")"),
        disable=args.quiet,
    ) as bar:
        try:
            head, report = train_head(
                point,
                [item["text"] for item in items],
                labels,
                role.label_names,
                role=role.name,
                model_sha256=sha,
                layers=layers,
                holdout=args.holdout,
                progress=bar.update,
                source=", ".join(Path(path).name for path in args.data) if args.data else f"{role.name} examples",
                # Other roles read the whole text (what it is about); the mood's heads keep their
                # scoring position alone, as the shipped ones do.
                pooling="last" if role is mood else "last+mean",
                ngrams=role is not mood and args.ngrams,
            )
        except HeadError as err:
            raise CliError(str(err)) from None
    path = head.save(Path(args.output_dir) if args.output_dir else assistant.head_directory())
    report.update({"head": str(path), "model_sha256": sha, "reads": head.point, "role": role.name})
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    prompt_alone = report["heldout_accuracy_prompt"]
    print(
        f"held-out accuracy on {report['heldout']} of {report['examples']} texts: head "
        f"{report['heldout_accuracy_head']:.3f}"
        + (f", prompt alone {prompt_alone:.3f}" if prompt_alone is not None else "")
        + (
            f", hidden state alone {report['heldout_accuracy_hidden_alone']:.3f}"
            if "heldout_accuracy_hidden_alone" in report
            else ""
        )
        + f" (after block {report['layers']}, L2 {report['l2']:g}; {report['seconds']:.0f} s)"
    )
    if on_chat_lane:
        print(
            f"saved {path}; the respond flow reads the {role.name} with it from now on, with this model "
            f"and the {settings.chat_prompt!r} chat prompt (--shared-prefill false turns it off)"
        )
    elif own_head:
        print(
            f"saved {path}; used from now on with this model and the {head.point!r} prompt "
            f"(--sentiment-head false turns it off)"
        )
    else:
        print(f"saved {path}; role {role.name!r} is answered by it from now on, on the analysis pass")
    return 0


def _train_phrase_head(args, settings: Settings, role) -> int:
    """train-head DATA --role keywords: a phrase head on the analysis pass, from texts with their
    key phrases (or the role file's examples)."""
    from ..evaluation.data import DataError, load_phrased
    from ..roles.extract import PhraseExample, default_phrase_layers, train_phrase_head
    from ..roles.head import HeadError

    try:
        if args.data:
            rows = load_phrased(*args.data)
            examples = [PhraseExample(row["text"], tuple(row["present_keywords"] or row["keywords"])) for row in rows]
        else:
            examples = [PhraseExample(e.text, e.phrases) for e in role.examples]
    except DataError as err:
        raise CliError(str(err)) from None
    if not 0.05 <= args.holdout <= 0.5:
        raise CliError("--holdout must be between 0.05 and 0.5")
    assistant = load_assistant(settings)
    sha = assistant.model_sha256()
    if sha is None:
        raise CliError("a head is keyed by the model file's sha256: train it on a GGUF model")
    if assistant.head is None:
        raise CliError("a phrase head reads the analysis pass, which needs the sentiment head")
    layers = default_phrase_layers(assistant.engine.n_layers) if args.layers is None else args.layers
    if not 0 < layers <= assistant.head.layers:
        raise CliError(f"a phrase head reads the analysis pass, after block 1 to {assistant.head.layers}")
    point = assistant.analysis_point().key
    with progress_bar(
        total=len(examples), desc=f"train-head {role.name}@{point} (hidden states)", disable=args.quiet
    ) as bar:
        try:
            head, report = train_phrase_head(
                examples,
                assistant.analyst.text_pass,
                assistant.engine.token_bytes,
                role=role,
                model_sha256=sha,
                point=point,
                layers=layers,
                holdout=args.holdout,
                progress=bar.update,
                source=", ".join(Path(path).name for path in args.data) if args.data else f"{role.name} examples",
            )
        except HeadError as err:
            raise CliError(str(err)) from None
    path = head.save(Path(args.output_dir) if args.output_dir else assistant.head_directory())
    report.update({"head": str(path), "model_sha256": sha, "reads": point, "role": role.name})
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(
        f"held-out F1@5 on {report['heldout']} of {report['texts']} texts: head {report['heldout_f1@5_head']:.3f}, "
        f"counts alone {report['heldout_f1@5_counts']:.3f} (after block {report['layers']}; {report['seconds']:.0f} s)"
    )
    print(f"saved {path}; role {role.name!r} ranks its phrases with it from now on, on the analysis pass")
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
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    by_lang = report["pass_rate_by_lang"]
    adapter = f", adapter {report['chat_adapter']}" if report["chat_adapter"] else ", no adapter"
    print(
        f"pass rate {report['pass_rate']:.2f} (zh {by_lang['zh']:.2f}, en {by_lang['en']:.2f}) with chat prompt "
        f"{settings.chat_prompt!r}{adapter}"
    )
    if args.turns:
        print(
            f"{report['conversations']} conversations; by turn: "
            + ", ".join(f"{turn}: {rate:.2f}" for turn, rate in report["pass_rate_by_turn"].items())
            + f"; whole conversations passing: {report['conversations_passing']:.2f}"
        )
    else:
        print(
            f"sentiment right for {report['sentiment_accuracy']:.2f}; from the message, p50: sentiment "
            f"{report['sentiment_ms']['p50']:.0f} ms, "
            f"first reply token {report['time_to_first_token_ms']['p50']:.0f} ms"
        )
    for kind, count in report["failures"].items():
        print(f"  {kind:<18} {count:4d}  ({report['failure_share'][kind]:.1%} of replies)")
    print(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    return 0


def register(command) -> None:
    p = command(
        "eval",
        cmd_eval,
        "Accuracy, per language/source, confusion matrix, latency on labelled JSONL; for an extract "
        "role (keywords), F1@5 and F1@10 on texts with their key phrases.",
    )
    p.add_argument("data", metavar="DATA.jsonl")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--role", metavar="NAME", help="the choice or extract role to evaluate (default: sentiment)")
    p.add_argument(
        "--out",
        metavar="PRED.jsonl",
        help='an extract role\'s answers, one line per text: {"id", "keywords": [...]}',
    )
    p.add_argument(
        "--labels",
        metavar="LABELS.json",
        help="a label manifest (source -> labels with descriptions): each row is scored against its "
        "own source's labels, zero-shot from the names and descriptions, or with --train by a head per source",
    )
    p.add_argument(
        "--train",
        metavar="TRAIN.jsonl",
        help="with --labels: fit a head per source on this file first (cached by content: a second run trains nothing)",
    )
    p.add_argument(
        "--method",
        choices=["score", "prompt", "seed", "chat"],
        default="score",
        help="score, prompt, seed: as in analyze; chat: the respond flow's sentiment, read by the chat "
        "head on the chat lane's pass over the text as a first message",
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N texts")
    p.add_argument(
        "--cut",
        type=int,
        default=0,
        metavar="CHARS",
        help="extract roles: only the texts at least this long, each cut to this many characters "
        "(latency at one text length; the gold is what still occurs in the cut)",
    )
    p.add_argument("--plot", metavar="PNG", help="also draw a reliability diagram (probability vs accuracy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command(
        "train-head",
        cmd_train_head,
        "Train a choice role's learned head for the current model on labelled JSONL (text and "
        "label, or a chat file's message and sentiment), or on the role file's examples; used "
        "automatically afterwards.",
    )
    p.add_argument(
        "data",
        metavar="DATA.jsonl",
        nargs="*",
        help="one or more files, read as one set (none: the role file's own examples)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share kept aside (stratified) to report held-out accuracy before the final fit",
    )
    p.add_argument("--output-dir", metavar="DIR", help="where to save the head (default: <home>/heads)")
    p.add_argument(
        "--role",
        metavar="NAME",
        help="sentiment (default): the analyst's head (analyze, batch, /v1/sentiment, eval); chat: a "
        "sentiment head that reads at the end of the user's message inside the chat prompt, so that the "
        "respond flow evaluates a message once for both roles (shared prefill); any other choice role: "
        "a head on the analysis pass, shared with the sentiment",
    )
    p.add_argument(
        "--layers",
        type=int,
        metavar="K",
        help="read the residual stream after K transformer blocks (default: 5/8 of the model's "
        "depth, 15 of 24 for the default model, where the analyst's pass stops; lower is faster, "
        "higher may be more accurate; for --role chat the last block but one, free there)",
    )
    p.add_argument(
        "--label-map",
        metavar="FROM=TO,...",
        help="rename the DATA files' labels to the role's (e.g. joy=positive,sadness=negative); "
        "TO '-' leaves those lines out, FROM '*' stands for every other label that is not the role's",
    )
    p.add_argument(
        "--no-ngrams",
        dest="ngrams",
        action="store_false",
        help="a head of a role other than the mood reads the hidden state alone (by default it also "
        "carries a model of the texts' character and word n-grams, mixed with it: docs/roles.md)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command(
        "eval-chat",
        cmd_eval_chat,
        "Reply to each message (a new conversation each) and check the "
        "replies against the chat rubric; pass rate and failures by kind.",
    )
    p.add_argument(
        "data",
        metavar="MESSAGES.jsonl",
        nargs="?",
        help="lines with id, lang (zh|en), sentiment, message; with --turns, scripted conversations "
        "(default: the packaged ones)",
    )
    p.add_argument(
        "--turns",
        action="store_true",
        help="scripted conversations, each in one session: lines with id, lang and turns (message, "
        "sentiment, expect_any: words a reply that follows the conversation would use)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--out", metavar="REPLIES.jsonl", help="write every reply with its failures, to read them")
    p.add_argument(
        "--method",
        choices=["default", "seed"],
        default="default",
        help="seed: the original chat format (and no script guard), for comparison",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
