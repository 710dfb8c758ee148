"""The command line, run as a user runs it (a subprocess each), on the real default model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(args, env, stdin: bytes | str | None = None, timeout=300):
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "allinone", *args], input=stdin, capture_output=True, env=env, timeout=timeout
    )
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def test_analyze_json_acceptance_example(cli_env):
    code, out, err = run(
        ["analyze", "--json", "今天的实验终于成功了,太棒了!", "The service was slow and the food was cold."], cli_env
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    for row in rows:
        assert set(row) == {"text", "label", "probability", "latency_ms"}
        assert 0.5 <= row["probability"] <= 1


def test_analyze_reads_stdin_lines(cli_env):
    code, out, err = run(["analyze", "--json"], cli_env, stdin="太好吃了!\n\nterrible, never again\n")
    assert code == 0, err
    assert [json.loads(line)["label"] for line in out.splitlines()] == ["positive", "negative"]


def test_model_json(cli_env):
    code, out, err = run(["model", "--json"], cli_env)
    assert code == 0, err
    info = json.loads(out)
    # the derived fast form of the default model, made by `make setup` (install-model)
    assert info["sha256"] == "360bc2830f3df042679576c8342bcf124fb1deb8dbb18e2f31eff2aa3e72448c"
    assert info["size"] == 496_797_568 and info["verified"] is True
    assert info["architecture"] == "qwen2" and info["context_length"] == 32768
    code, out, err = run(["model", "--json", "--default-weights", "q4_k_m"], cli_env)
    info = json.loads(out)
    assert info["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert info["size"] == 491_400_064 and info["verified"] is True


def test_chat_shows_sentiment_then_reply_and_handles_commands(cli_env):
    stdin = "今天的实验终于成功了,太棒了!\n/reset\nI lost my wallet today.\n/exit\n"
    code, out, err = run(["chat", "--reply-max-tokens", "32"], cli_env, stdin=stdin)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "😄 LLM 情感判断: 正面"
    assert lines[1].strip()  # the reply
    assert "(new conversation)" in lines
    after_reset = lines[lines.index("(new conversation)") + 1 :]
    assert after_reset[0] == "😞 LLM 情感判断: 负面"
    assert after_reset[1].strip()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_batch_is_resumable_without_duplicates_or_loss(cli_env, tmp_path):
    rows = [
        {"id": f"t{i}", "text": t, "label": "gold", "extra": i}
        for i, t in enumerate(["很好", "很差", "great stuff", "awful", "还不错", "meh, broken on arrival"])
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    code, _, err = run(["batch", str(src), "-o", str(out)], cli_env)
    assert code == 0, err
    complete = out.read_text(encoding="utf-8").splitlines()
    assert len(complete) == 6
    first = json.loads(complete[0])
    assert first["id"] == "t0" and first["extra"] == 0 and first["input_label"] == "gold"
    assert first["label"] in ("positive", "negative") and 0.5 <= first["probability"] <= 1
    # simulate an interruption: three lines written, the fourth torn mid-write
    out.write_text("\n".join(complete[:3]) + "\n" + complete[3][:10], encoding="utf-8")
    code, _, err = run(["batch", str(src), "-o", str(out)], cli_env)
    assert code == 0, err
    assert "3 already done" in err
    resumed = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in rows]
    assert [r["label"] for r in resumed] == [json.loads(line)["label"] for line in complete]


def test_eval_json_has_the_documented_fields(cli_env, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(
        data,
        [
            {"text": "太棒了,非常满意", "label": "positive", "lang": "zh", "source": "a"},
            {"text": "The worst hotel I have ever stayed in.", "label": "negative", "lang": "en", "source": "b"},
        ],
    )
    for method in ("score", "seed"):
        code, out, err = run(["eval", str(data), "--json", "--method", method], cli_env)
        assert code == 0, err
        report = json.loads(out)
        assert report["n"] == 2 and report["method"] == method
        assert set(report["by_lang"]) == {"zh", "en"} and set(report["by_source"]) == {"a", "b"}
        assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p95"] >= report["latency_ms"]["p50"]
        assert sum(sum(row.values()) for row in report["confusion"].values()) == 2


def test_eval_chat_reports_pass_rate_and_writes_replies(cli_env, tmp_path):
    data, out = tmp_path / "chat.jsonl", tmp_path / "replies.jsonl"
    write_jsonl(
        data,
        [
            {"id": "a", "lang": "zh", "sentiment": "positive", "message": "我今天学会了游泳!"},
            {"id": "b", "lang": "en", "sentiment": "negative", "message": "My phone fell in the lake."},
        ],
    )
    code, stdout, err = run(["eval-chat", str(data), "--json", "--out", str(out), "--reply-max-tokens", "48"], cli_env)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["n"] == 2 and 0.0 <= report["pass_rate"] <= 1.0
    assert set(report["pass_rate_by_lang"]) == {"zh", "en"}
    assert report["shared_prefill"] and report["sentiment_accuracy"] == 1.0  # two clear messages
    assert 0 < report["sentiment_ms"]["p50"] < report["time_to_first_token_ms"]["p50"]
    replies = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in replies] == ["a", "b"]
    assert all(r["reply"].strip() and isinstance(r["failures"], list) for r in replies)


def test_eval_chat_turns_follows_scripted_conversations(cli_env, tmp_path):
    data, out = tmp_path / "turns.jsonl", tmp_path / "replies.jsonl"
    write_jsonl(
        data,
        [
            {
                "id": "c1",
                "lang": "en",
                "turns": [
                    {"message": "My cat has been sick all week.", "sentiment": "negative"},
                    {
                        "message": "The vet says she will be fine!",
                        "sentiment": "positive",
                        "expect_any": ["cat", "she", "her"],
                    },
                ],
            }
        ],
    )
    code, stdout, err = run(
        ["eval-chat", str(data), "--turns", "--json", "--out", str(out), "--reply-max-tokens", "40"], cli_env
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["conversations"] == 1 and report["n"] == 2 and set(report["pass_rate_by_turn"]) == {"1", "2"}
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["turn"] for r in rows] == [1, 2] and all(r["reply"].strip() for r in rows)
    code, stdout, err = run(["eval-chat", "--turns", "--json", "--reply-max-tokens", "8", "--quiet"], cli_env)
    assert code == 0, err  # the packaged scripted conversations
    assert json.loads(stdout)["conversations"] >= 8


def test_eval_reports_calibration_and_draws_the_reliability_diagram(cli_env, tmp_path):
    data, png = tmp_path / "data.jsonl", tmp_path / "reliability.png"
    write_jsonl(
        data,
        [
            {"text": "太棒了,非常满意", "label": "positive"},
            {"text": "The worst hotel I have ever stayed in.", "label": "negative"},
            {"text": "还行吧,一般般", "label": "negative"},
        ],
    )
    code, out, err = run(["eval", str(data), "--json", "--plot", str(png)], cli_env)
    assert code == 0, err
    calibration = json.loads(out)["calibration"]
    assert 0.0 <= calibration["ece"] <= 1.0 and sum(b["n"] for b in calibration["bins"]) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_smoke_compares_methods_in_one_run(cli_env, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(
        data,
        [
            {"text": t, "label": label}
            for t, label in [
                ("太棒了,非常满意", "positive"),
                ("The worst hotel I have ever stayed in.", "negative"),
                ("Lovely staff, would come back.", "positive"),
                ("送餐太慢了,菜都凉了", "negative"),
            ]
        ],
    )
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"message": "今天升职了!"}, {"message": "My cat is sick."}])
    plot = tmp_path / "bench.png"
    code, out, err = run(
        [
            "bench",
            "--texts",
            str(data),
            "--json",
            "--quiet",
            "--no-original",
            "--chat-messages",
            str(chat),
            "--plot",
            str(plot),
        ],
        cli_env,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["n"] == 4 and {"score", "seed", "raw-llama-cpp-python"} <= set(report["methods"])
    assert report["speedup_score_vs_seed"] > 0 and report["speedup_vs_raw_llama_cpp_python"] > 0
    assert report["peak_rss_mb"] > 0
    assert report["chat"]["n"] == 2 and report["chat"]["ours"]["first_token_ms_p50"] > 0
    assert report["chat"]["ours"]["shared_prefill"] and report["chat"]["two_passes"]["first_token_ms_p50"] > 0
    assert report["chat"]["raw_llama_cpp_python"]["decode_tokens_per_s"] > 0
    # the packaged chat adapter against the model's own weights, as ratios of medians and per
    # message (over two messages, a first pass or a second opinion can swing them either way)
    for cost in (report["chat"]["adapter_cost"], report["chat"]["adapter_cost_paired"]):
        assert set(cost) == {"sentiment_ms_ratio", "first_token_ms_ratio", "decode_tokens_per_s_ratio"}
        assert all(value > 0 for value in cost.values()), cost
    assert plot.stat().st_size > 1000
    assert "server peer is skipped" in err


@pytest.mark.slow
def test_bench_memory_reads_a_real_server_after_each_workload(cli_env, tmp_path):
    for name in ("sentiment-dev", "intent-dev", "emotion-dev"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": "快递三天没动了,怎么回事?"}, {"text": "Great service!"}])
    write_jsonl(tmp_path / "keywords-dev.jsonl", [{"text": "Neural networks for image denoising. " * 30}])
    write_jsonl(
        tmp_path / "chat-real-dev.jsonl", [{"message": m} for m in ("今天升职了!", "My cat is sick.", "它好多了")]
    )
    code, out, err = run(
        ["bench-memory", "--data-dir", str(tmp_path), "--limit", "2", "--reply-max-tokens", "12", "--json"],
        cli_env,
    )
    assert code == 0, err
    report = json.loads(out)
    loaded = report["after_load"]
    assert [w["requests"] for w in report["workloads"]] == [2, 4, 1, 2, 2, 2]
    peaks = [loaded["peak_rss_mb"]] + [w["peak_rss_mb"] for w in report["workloads"]]
    assert loaded["rss_mb"] > 100 and peaks == sorted(peaks) and report["peak_rss_mb"] == peaks[-1]
    assert all(w["rss_mb"] <= w["peak_rss_mb"] for w in report["workloads"])


@pytest.mark.slow
def test_bench_runs_the_original_recipe_and_our_scoring_on_its_float32_model(cli_env, tmp_path, tiny_model_dir):
    """The slow baselines, on the tiny Qwen2 built by the tests instead of the real float32 model."""
    data = tmp_path / "data.jsonl"
    write_jsonl(
        data,
        [
            {"text": "太棒了,非常满意", "label": "positive"},
            {"text": "The worst hotel I have ever stayed in.", "label": "negative"},
        ],
    )
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"message": "今天升职了!"}])
    code, out, err = run(
        [
            "bench",
            "--texts",
            str(data),
            "--json",
            "--quiet",
            "--no-raw",
            "--original-model",
            str(tiny_model_dir),
            "--chat-messages",
            str(chat),
        ],
        cli_env,
    )
    assert code == 0, err
    report = json.loads(out)
    assert {"original", "prompt-transformers"} <= set(report["methods"])
    assert report["methods"]["prompt-transformers"]["n"] == 2
    assert report["speedup_vs_original"] > 0 and report["speedup_prompt_transformers_vs_original"] > 0


# ---- train-head: the learned head on the real model -------------------------------------------------


def home_with_models(tmp_path, cli_env) -> dict:
    """A fresh ALLINONE_HOME that shares the installed models but has no heads of its own."""
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(Path(cli_env["ALLINONE_HOME"]) / "models")
    return {**cli_env, "ALLINONE_HOME": str(home)}


TRAIN_TEXTS = [
    ("太棒了,非常满意", "positive"),
    ("服务很好,下次还来", "positive"),
    ("味道不错,物流也快", "positive"),
    ("质量很好,推荐购买", "positive"),
    ("The staff were lovely and helpful.", "positive"),
    ("Great value, I would buy it again.", "positive"),
    ("An excellent, moving film.", "positive"),
    ("Fast delivery and it works perfectly.", "positive"),
    ("房间干净,位置方便", "positive"),
    ("非常好用,超出预期", "positive"),
    ("Best coffee in town!", "positive"),
    ("I love this phone.", "positive"),
    ("太差了,再也不买了", "negative"),
    ("送餐太慢,菜都凉了", "negative"),
    ("质量很差,用了一天就坏", "negative"),
    ("客服态度恶劣", "negative"),
    ("The worst hotel I have ever stayed in.", "negative"),
    ("It broke after two days.", "negative"),
    ("A dull, boring film.", "negative"),
    ("Rude staff and cold food.", "negative"),
    ("房间又脏又吵", "negative"),
    ("完全是浪费钱", "negative"),
    ("Terrible battery life.", "negative"),
    ("I want my money back.", "negative"),
]


@pytest.mark.slow
def test_train_head_learns_from_a_small_file_and_changes_predictions(cli_env, tmp_path):
    env = home_with_models(tmp_path, cli_env)
    # Labels inverted on purpose: a head that learns must then disagree with the prompt alone.
    flipped = {"positive": "negative", "negative": "positive"}
    data = tmp_path / "mine.jsonl"
    write_jsonl(data, [{"text": t, "label": flipped[label]} for t, label in TRAIN_TEXTS])
    probe = ["今天的实验终于成功了,太棒了!", "The service was slow and the food was cold."]
    code, out, err = run(["analyze", "--json", *probe], env)
    before = [json.loads(line)["label"] for line in out.splitlines()]
    assert before == ["positive", "negative"], err

    code, out, err = run(["train-head", str(data), "--json", "--quiet"], env, timeout=900)
    assert code == 0, err
    report = json.loads(out)
    assert report["examples"] == len(TRAIN_TEXTS) and report["heldout"] >= 2
    assert report["heldout_accuracy_head"] > report["heldout_accuracy_prompt"]
    head_file = tmp_path / "home" / "heads" / report["head"].rsplit("/", 1)[-1]
    assert head_file.is_file()

    code, out, err = run(["analyze", "--json", *probe], env)
    assert [json.loads(line)["label"] for line in out.splitlines()] == ["negative", "positive"], err
    code, out, err = run(["analyze", "--json", "--sentiment-head", "false", *probe], env)
    assert [json.loads(line)["label"] for line in out.splitlines()] == before


@pytest.mark.slow
def test_chat_head_is_read_on_the_reply_pass_and_learns_from_a_small_file(cli_env, tmp_path):
    env = home_with_models(tmp_path, cli_env)
    flipped = {"positive": "negative", "negative": "positive"}
    data = tmp_path / "mine.jsonl"
    write_jsonl(data, [{"text": t, "label": flipped[label]} for t, label in TRAIN_TEXTS])
    chat_input = "今天的实验终于成功了,太棒了!\nThe service was slow and the food was cold.\n"

    def detected(*flags):
        code, out, err = run(["chat", "--reply-max-tokens", "4", *flags], env, stdin=chat_input)
        assert code == 0, err
        return [line.split(": ")[1] for line in out.splitlines() if "LLM 情感判断" in line]

    assert detected() == ["正面", "负面"]  # the packaged chat head
    code, out, err = run(["train-head", str(data), "--role", "chat", "--json", "--quiet"], env, timeout=900)
    assert code == 0, err
    report = json.loads(out)
    assert report["reads"].startswith("chat-warm@") and report["heldout_accuracy_prompt"] is None  # the adapted lane
    assert (tmp_path / "home" / "heads" / report["head"].rsplit("/", 1)[-1]).is_file()
    # the user's head, trained on inverted labels, wins (taken as it reads, even when unsure)
    assert detected("--second-opinion-below", "0.5") == ["负面", "正面"]
    assert detected("--shared-prefill", "false") == ["正面", "负面"]  # the analyst's head, on its own pass
    code, _, err = run(["train-head", str(data), "--role", "chat", "--chat-prompt", "original"], env)
    assert code == 2 and "puts the mood tag before the message" in err


@pytest.mark.slow
def test_a_role_added_by_a_file_alone_answers_zero_shot_then_learns_from_its_examples(cli_env, tmp_path):
    """The customer-service example, dropped into <home>/roles: it answers at once by its prompt,
    then `train-head --role` fits a head on its own examples (well within two minutes), and the
    role is answered on the sentiment's pass from then on."""
    from allinone.roles.definition import BUILTIN_DIR

    env = home_with_models(tmp_path, cli_env)
    roles = tmp_path / "home" / "roles"
    roles.mkdir()
    (roles / "support.json").write_bytes((BUILTIN_DIR.parent / "examples" / "customer-service.json").read_bytes())
    texts = ["快递显示已经签收了,可我根本没收到东西!", "I'd like to return these shoes and get my money back."]
    code, out, err = run(["roles", "--json"], env)
    assert code == 0 and any(
        r["name"] == "support_intent" and r["source"].endswith("support.json") for r in json.loads(out)
    )
    code, out, err = run(["analyze", "--json", "--roles", "sentiment,support_intent", *texts], env)
    assert code == 0, err
    zero_shot = [json.loads(line)["roles"]["support_intent"] for line in out.splitlines()]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in zero_shot)

    code, out, err = run(["train-head", "--role", "support_intent", "--json", "--quiet"], env, timeout=300)
    assert code == 0, err
    report = json.loads(out)
    assert report["role"] == "support_intent" and report["examples"] >= 50 and report["seconds"] < 120
    code, out, err = run(["analyze", "--json", "--roles", "sentiment,support_intent", *texts], env)
    assert code == 0, err
    rows = [json.loads(line)["roles"] for line in out.splitlines()]
    assert [r["support_intent"]["label"] for r in rows] == ["shipping_problem", "refund"]
    assert rows[0]["sentiment"]["label"] == "negative"
    code, _, err = run(["analyze", "--roles", "sentiment,nope", "hi"], env)
    assert code == 2 and "unknown role 'nope'; roles: " in err
    source, labelled = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": i, "text": t} for i, t in enumerate(texts)])
    code, _, err = run(["batch", str(source), "-o", str(labelled), "--roles", "support_intent,sentiment"], env)
    assert code == 0, err
    lines = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert [line["roles"]["support_intent"]["label"] for line in lines] == ["shipping_problem", "refund"]
    assert [line["id"] for line in lines] == [0, 1] and "label" not in lines[0]


LABEL_MANIFEST = {
    "Shop-EN": [
        {"label": "refund", "description": "the customer wants money back"},
        {"label": "delivery", "description": "where the parcel is, or when it arrives"},
        {"label": "praise", "description": "the customer is happy with the product"},
    ],
    "Clinic-ZH": [
        {"label": "booking", "description": "预约挂号,改约或取消"},
        {"label": "symptom", "description": "描述身体不适,问是什么病"},
        {"label": "cost", "description": "问费用、医保报销"},
    ],
}
LABEL_SET_TRAIN = {
    ("Shop-EN", "refund"): [
        "I want my money back for this broken kettle.",
        "Please refund my order, it never worked.",
        "How do I get a refund for the jacket?",
        "Can you return the money to my card?",
        "I returned the shoes last week, where is my refund?",
        "Cancel the order and refund me please.",
        "The blender is faulty, I'd like a full refund.",
        "I was charged twice, give me one payment back.",
    ],
    ("Shop-EN", "delivery"): [
        "Where is my parcel? It has been ten days.",
        "When will my order arrive?",
        "The tracking number shows nothing.",
        "My package says delivered but it is not here.",
        "Can you ship it to my office instead?",
        "How long does shipping to Canada take?",
        "The courier never came today.",
        "Is express delivery available for this item?",
    ],
    ("Shop-EN", "praise"): [
        "I love this lamp, it looks beautiful.",
        "Great quality, my kids adore the toy.",
        "The headphones sound amazing, thank you!",
        "Best purchase I made this year.",
        "Wonderful coffee maker, works perfectly.",
        "The dress fits perfectly and feels soft.",
        "Really happy with this backpack.",
        "Excellent knife, very sharp and well made.",
    ],
    ("Clinic-ZH", "booking"): [
        "我想预约明天上午的内科门诊。",
        "周五的专家号还能挂吗?",
        "帮我把下周二的预约改到周四。",
        "我要取消明天的挂号。",
        "怎么在网上挂儿科的号?",
        "皮肤科最早什么时候可以约?",
        "能帮我约一个牙科复诊吗?",
        "挂号要提前几天?",
    ],
    ("Clinic-ZH", "symptom"): [
        "我头疼了三天,还有点发烧。",
        "孩子一直咳嗽,晚上睡不好,是怎么回事?",
        "最近胃经常胀痛,吃完饭更厉害。",
        "膝盖走路的时候很疼,是关节炎吗?",
        "嗓子疼,吞东西都困难。",
        "皮肤起了很多红疹子,很痒。",
        "我总是失眠,白天头晕。",
        "胸口闷,喘不上气,需要担心吗?",
    ],
    ("Clinic-ZH", "cost"): [
        "做一次胃镜要多少钱?",
        "这个药医保能报销吗?",
        "住院押金要交多少?",
        "体检套餐的价格是多少?",
        "拔牙的费用大概多少?",
        "异地医保可以在这里结算吗?",
        "核磁共振检查贵不贵?",
        "门诊费用能用医保卡支付吗?",
    ],
}
LABEL_SET_DEV = {
    ("Shop-EN", "refund"): ["The toaster burnt out, I want my money returned.", "Please give me a refund for the mug."],
    ("Shop-EN", "delivery"): ["My order still has not shipped.", "When does the parcel get to Berlin?"],
    ("Shop-EN", "praise"): ["This chair is fantastic and comfy.", "Lovely teapot, I'm delighted."],
    ("Clinic-ZH", "booking"): ["我想约下周一的眼科号。", "能不能改一下明天的挂号时间?"],
    ("Clinic-ZH", "symptom"): ["我肚子疼,还拉肚子。", "最近老是咳嗽,还有痰。"],
    ("Clinic-ZH", "cost"): ["做个CT要花多少钱?", "这个手术医保报多少?"],
}


def label_set_rows(texts: dict) -> list[dict]:
    return [
        {"text": text, "label": label, "source": source, "lang": "zh" if source.endswith("ZH") else "en"}
        for (source, label), items in texts.items()
        for text in items
    ]


@pytest.mark.slow
def test_eval_against_a_label_manifest_trains_a_head_per_source_once_and_scores_zero_shot(cli_env, tmp_path):
    """`eval --labels`: each row against its own source's labels; with --train a head per source is
    fitted first and cached by content (the second run trains nothing and answers the same);
    without it, zero-shot from the names and descriptions."""
    env = home_with_models(tmp_path, cli_env)
    manifest, train, dev = tmp_path / "labels.json", tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    manifest.write_text(json.dumps(LABEL_MANIFEST, ensure_ascii=False), encoding="utf-8")
    write_jsonl(train, label_set_rows(LABEL_SET_TRAIN))
    write_jsonl(dev, label_set_rows(LABEL_SET_DEV))
    command = ["eval", str(dev), "--labels", str(manifest), "--train", str(train), "--json"]
    code, out, err = run(command, env)
    assert code == 0, err
    assert err.count("training a head for") == 2, err
    first = json.loads(out)
    assert first["method"] == "head" and first["n"] == 12
    assert set(first["by_source"]) == {"Shop-EN", "Clinic-ZH"} and set(first["by_lang"]) == {"en", "zh"}
    assert {"accuracy", "macro_f1", "latency_ms"} <= set(first) and "confusion" not in first
    assert first["latency_ms"]["p50"] <= first["latency_ms"]["p95"]
    assert first["accuracy"] >= 10 / 12, first
    assert list((tmp_path / "home" / "heads" / "cache").iterdir()), "the heads are cached"

    code, out, err = run(command, env)
    assert code == 0, err
    assert "training a head" not in err
    again = json.loads(out)
    assert again["accuracy"] == first["accuracy"] and again["by_source"] == first["by_source"]

    code, out, err = run(["eval", str(dev), "--labels", str(manifest), "--json"], env)
    assert code == 0, err
    zero_shot = json.loads(out)
    assert zero_shot["method"] == "zero-shot" and zero_shot["train"] is None
    assert set(zero_shot["by_source"]) == {"Shop-EN", "Clinic-ZH"} and zero_shot["accuracy"] > 1 / 3

    stray = tmp_path / "stray.jsonl"
    write_jsonl(stray, [*label_set_rows(LABEL_SET_DEV)[:2], {"text": "hi", "label": "refund", "source": "Bank"}])
    code, _, err = run(["eval", str(stray), "--labels", str(manifest)], env)
    assert code == 2 and f"{stray} line 3: source 'Bank' is not in the label manifest" in err, err
    write_jsonl(stray, [{"text": "hi", "label": "cost", "source": "Shop-EN"}])
    code, _, err = run(["eval", str(dev), "--labels", str(manifest), "--train", str(stray)], env)
    assert code == 2 and f"{stray} line 1: label 'cost' is not one of Shop-EN's labels" in err, err


FORTY_TEXTS = [
    *(
        "今天的实验终于成功了,太棒了!",
        "快递又丢了,客服还不理人。",
        "这家店的面很好吃,下次还来。",
        "排队两个小时,最后告诉我卖完了。",
    ),
    *(
        "新买的耳机音质不错,就是有点夹头。",
        "房东突然要涨房租,真头疼。",
        "孩子第一次自己系鞋带,好开心。",
        "电脑蓝屏,论文没保存。",
    ),
    *("周末爬山看到了云海,值了!", "地铁坏了,上班迟到被扣钱。", "朋友送了我一束花,心情大好。", "手机屏幕摔碎了。"),
    *("终于拿到驾照了!", "这部电影剧情拖沓,看睡着了。", "年终奖比预期多,开心。", "外卖送错了,还是凉的。"),
    *("老师表扬了我的作文。", "航班延误六个小时。", "新同事人很好,很热心。", "牙疼了一整晚。"),
    *("The service was slow and the food was cold.", "Best concert I have been to in years!"),
    *("My package arrived broken.", "The new update fixed every bug I had.", "I waited an hour on hold for nothing."),
    *("What a lovely surprise party, thank you all!", "The hotel room smelled of smoke."),
    *("Our team won the final!", "The battery dies after two hours.", "Great value, would buy again."),
    *("The instructions made no sense at all.", "I finally paid off my student loans!"),
    *("The train was cancelled again.", "This coffee is perfect.", "Customer support hung up on me."),
    *("The garden looks beautiful this spring.", "My flight lost my luggage.", "Such a kind and helpful nurse."),
    *("The app crashes every time I open it.", "We adopted a puppy today!"),
]


def test_batch_on_ray_matches_the_single_process_run(cli_env, tmp_path):
    """The acceptance command on 40 texts: 2 actors × 1 thread on a local Ray give the same
    labels and probabilities as the single-process run (which uses both cores in one model)."""
    pytest.importorskip("ray", reason="the scale extra is not installed")
    rows = [{"id": f"r{i}", "text": text} for i, text in enumerate(FORTY_TEXTS)]
    src = tmp_path / "dev40.jsonl"
    write_jsonl(src, rows)
    here, on_ray = tmp_path / "here.jsonl", tmp_path / "ray.jsonl"
    code, _, err = run(["batch", str(src), "-o", str(here)], cli_env, timeout=600)
    assert code == 0, err
    code, _, err = run(
        ["batch", str(src), "-o", str(on_ray), "--ray", "--actors", "2", "--threads-per-actor", "1"],
        cli_env,
        timeout=900,
    )
    assert code == 0, err
    assert "40 labelled, 0 already done, 40 in all" in err
    assert "core_worker" not in err and "Running Dataset" not in err  # Ray's own logs stay off
    single = [json.loads(line) for line in here.read_text(encoding="utf-8").splitlines()]
    spread = [json.loads(line) for line in on_ray.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in spread] == [r["id"] for r in rows]
    assert [r["label"] for r in spread] == [r["label"] for r in single]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(spread, single, strict=True)) <= 1e-6


def test_batch_joins_a_two_node_ray_cluster(cli_env, tmp_path):
    """The multi-node path: a head and a second node started with `ray start` on this machine
    (1 CPU each, token authentication as `ray start` sets it up), joined by address; 2 actors of 1
    thread can only run one on each node."""
    pytest.importorskip("ray", reason="the scale extra is not installed")
    from tests.pgcluster import free_port

    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    env = {**cli_env, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats"]
    try:
        head = subprocess.run(
            [ray_cli, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert head.returncode == 0, head.stderr
        node = subprocess.run(
            [ray_cli, "start", "--address", f"127.0.0.1:{port}", *common],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert node.returncode == 0, node.stderr
        rows = [{"id": f"r{i}", "text": text} for i, text in enumerate(FORTY_TEXTS[:12])]
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_jsonl(src, rows)
        code, _, err = run(
            ["batch", str(src), "-o", str(out), "--ray", f"127.0.0.1:{port}", "--actors", "2"], env, timeout=600
        )
        assert code == 0, err
        labelled = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["id"] for r in labelled] == [r["id"] for r in rows]
        assert all(r["label"] in ("positive", "negative") for r in labelled)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
