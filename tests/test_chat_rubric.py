"""The chat rubric on handwritten good and bad replies (no model needed)."""

import pytest

from allinone.evaluation.chat_rubric import check_reply, copied_run, repeated_run, reply_language, speaks_as_user

GOOD = [
    (
        "zh",
        "positive",
        "我升职了!努力了三年终于被看见了。",
        "太为你高兴了!三年的坚持终于有了回报,今晚好好犒劳一下自己吧。",
    ),
    (
        "zh",
        "negative",
        "面试又被拒了,我是不是很差劲?",
        "被拒真的很让人沮丧,但这不代表你差劲。休息一下,我们再一起想想下一次怎么准备。",
    ),
    (
        "en",
        "positive",
        "I finally finished my first marathon!",
        "That is huge, congratulations! All those early runs paid off. How are your legs feeling?",
    ),
    (
        "en",
        "negative",
        "My dog passed away this morning.",
        "I'm so sorry. Losing a friend like that hurts deeply. I'm here if you want to talk about him.",
    ),
    # Naming what happened in a few of the user's words is listening, not copying.
    ("zh", "positive", "今天终于拿到驾照了,开心到飞起!", "恭喜拿到驾照!练车的辛苦总算有了回报,第一趟想开去哪里?"),
    (
        "en",
        "positive",
        "I got my first job offer as a software engineer.",
        "Congratulations on your first job offer! All that studying paid off. When do you start?",
    ),
    (
        "en",
        "negative",
        "My father is in the hospital and the doctors aren't sure what's wrong.",
        "I'm so sorry, not knowing is the hardest part. I hope the doctors find answers for your father soon.",
    ),
    (
        "en",
        "positive",
        "Today was my last chemo session.",
        "That's a huge milestone, congratulations! You've been so strong through all of it. How are you celebrating?",
    ),
    # A question about what the user might do is not a lecture; sympathy in the first person is not the user's story.
    (
        "en",
        "negative",
        "I have to move away from my home town for work.",
        "That's a big change, and leaving home is hard. Do you have to move soon, or is there some time?",
    ),
    (
        "zh",
        "negative",
        "好朋友结婚没有邀请我,有点难过。",
        "被好朋友落下的感觉一定很失落,我能理解你的难过。你们最近联系多吗?",
    ),
]


@pytest.mark.parametrize("lang,sentiment,message,reply", GOOD)
def test_good_replies_pass(lang, sentiment, message, reply):
    assert check_reply(message, reply, lang, sentiment) == []


@pytest.mark.parametrize(
    "lang,sentiment,message,reply,kind",
    [
        ("zh", "positive", "今天的实验终于成功了,太棒了!", "   ", "empty"),
        ("en", "positive", "I got the job!", "恭喜你找到工作!这是一个很好的开始,继续加油。", "language"),
        (
            "zh",
            "negative",
            "我丢了钱包。",
            "Sorry to hear that, I hope you find your wallet soon and that your day gets better.",
            "language",
        ),
        ("zh", "positive", "今天的实验终于成功了,太棒了!", "[情感标签:积极] 太好了,祝贺你的实验成功!", "tag_echo"),
        ("zh", "positive", "今天的实验终于成功了,太棒了!", "今天的实验终于成功了,太棒了!", "echo"),
        ("zh", "negative", "我失恋了,好难受。", "抱歉，我无法协助完成这个请求。", "refusal"),
        (
            "en",
            "negative",
            "I failed my exam.",
            "I'm sorry, but I can't help with that request right now, unfortunately.",
            "refusal",
        ),
        (
            "zh",
            "negative",
            "最近压力好大。",
            "这可能是由于以下几个原因:\n1. **学习压力大**\n2. 睡眠不足\n3. 缺少运动",
            "list_or_markdown",
        ),
        ("zh", "positive", "我升职了!", "好的。", "length"),
        (
            "zh",
            "negative",
            "孩子总是不听话,我觉得自己是个失败的妈妈。",
            "孩子总是不听话,我觉得自己是个失败的妈妈。你是不是需要帮助他?",
            "echo",
        ),
        (
            "zh",
            "negative",
            "期末挂了两门,奖学金也没了,这学期真是太倒霉了。",
            "哎呀,期末挂了两门,奖学金也没了。你真是个好人啊!",
            "copy",
        ),
        (
            "en",
            "negative",
            "My roommate moved out without paying the rent and now I have to cover it.",
            "Ugh, your roommate moved out without paying the rent? That is so unfair to you.",
            "copy",
        ),
        (
            "en",
            "positive",
            "I got my first job offer as a software engineer.",
            "That's amazing! I'm glad I got the job offer. I'm excited to work with you.",
            "as_user",
        ),
        (
            "en",
            "negative",
            "My father is in the hospital and the doctors aren't sure what's wrong.",
            "Sorry, I'm not sure what's wrong. I'll be in the hospital soon.",
            "as_user",
        ),
        ("zh", "negative", "我失业了,不知道该怎么办。", "我失业了,真的好难过,不知道以后怎么办。", "as_user"),
        (
            "en",
            "negative",
            "My roommate moved out without paying the rent.",
            "Oh no, that's a big mistake. I'm sorry that happened. You should have paid the rent.",
            "blame",
        ),
        (
            "zh",
            "negative",
            "考试没考好,被爸妈骂了一顿。",
            "考试没考好确实难受,但你应该早点复习,下次注意就好。",
            "blame",
        ),
        (
            "zh",
            "positive",
            "今天的实验终于成功了,太棒了!",
            "太棒了,实验成功真是太棒了,实验成功真是太棒了!",
            "repetition",
        ),
        (
            "en",
            "negative",
            "I lost my wallet on the train.",
            "That is so frustrating. I hope you find it soon. I hope you find it soon.",
            "repetition",
        ),
        (
            "en",
            "positive",
            "Today was my last chemo session.",
            "Oh no, that's a bit of a mess. I'm sorry for that. I'll try to make it better next time.",
            "tone",
        ),
        ("zh", "positive", "今天终于拿到驾照了,开心到飞起!", "今天终于拿到了驾照了,开心到飞起!", "echo"),
        (
            "en",
            "negative",
            "My manager took credit for my work again.",
            "That is great. I am sure he will be proud of you for your hard work.",
            "tone",
        ),
        ("zh", "negative", "养了十年的猫昨天走了。", "好，猫走的太开心了！今天能好好照顾吗？", "tone"),
        ("zh", "positive", "我升职了!", "(情绪:正面) 太好了,恭喜你升职!努力终于被看见了。", "tag_echo"),
        ("en", "positive", "I passed!", "Great!", "length"),
        ("zh", "negative", "我的猫走丢了。", "恭喜你!这真是一个值得庆祝的消息,好好享受吧。", "tone"),
        (
            "en",
            "positive",
            "We just had a baby girl!",
            "I'm so sorry to hear that. Please take care of yourself in this hard time.",
            "tone",
        ),
    ],
)
def test_bad_replies_fail_with_their_kind(lang, sentiment, message, reply, kind):
    assert kind in check_reply(message, reply, lang, sentiment)


def test_language_detection():
    assert reply_language("你好,今天怎么样?") == "zh"
    assert reply_language("Hello there, how was your day?") == "en"
    assert reply_language("太好了 OK") == "zh"
    assert reply_language("😊!!") == "none"


def test_cheerful_reply_to_bad_news_fails_on_tone():
    assert "tone" in check_reply(
        "My dog passed away this morning.", "That's amazing! I'm glad you had a wonderful day.", "en", "negative"
    )


def test_measures_behind_the_checks():
    assert copied_run("我今天终于拿到驾照了", "恭喜你拿到驾照!", "zh") == 4
    assert copied_run("I got my first job offer today", "Your first job offer, wow!", "en") == 3  # first job offer
    assert repeated_run("太棒了,太棒了!", "zh") == 3
    assert repeated_run("I hope so, I hope so.", "en") == 3
    assert repeated_run("No phrase comes back here at all.", "en") == 0


def test_blame_and_cheer_depend_on_the_news():
    # "You should..." after good news is a suggestion, not blame; cheer after good news is right.
    assert (
        check_reply(
            "I finally got my driving licence!",
            "Congratulations! You should take a road trip to celebrate.",
            "en",
            "positive",
        )
        == []
    )


@pytest.mark.parametrize(
    "message,reply,expected",
    [
        ("I got my first job offer.", "I got the job offer and I'm thrilled.", True),
        ("I got my first job offer.", "I'm so happy for you and your new job offer!", False),
        ("My cat died yesterday.", "I'm so sorry about your cat.", False),
        ("我的猫昨天走丢了。", "我的猫走丢了,好伤心。", True),
        ("我的猫昨天走丢了。", "猫走丢了一定很着急,我能理解你的心情。", False),
    ],
)
def test_speaks_as_user(message, reply, expected):
    lang = reply_language(message)
    assert speaks_as_user(message, reply, lang) is expected
