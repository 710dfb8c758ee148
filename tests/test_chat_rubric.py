"""The chat rubric on handwritten good and bad replies (no model needed)."""

import pytest

from allinone.evaluation.chat_rubric import check_reply, reply_language

GOOD = [
    ("zh", "positive", "我升职了!努力了三年终于被看见了。", "太为你高兴了!三年的坚持终于有了回报,今晚好好犒劳一下自己吧。"),
    ("zh", "negative", "面试又被拒了,我是不是很差劲?", "被拒真的很让人沮丧,但这不代表你差劲。休息一下,我们再一起想想下一次怎么准备。"),
    ("en", "positive", "I finally finished my first marathon!", "That is huge, congratulations! All those early runs paid off. How are your legs feeling?"),
    ("en", "negative", "My dog passed away this morning.", "I'm so sorry. Losing a friend like that hurts deeply. I'm here if you want to talk about him."),
]


@pytest.mark.parametrize("lang,sentiment,message,reply", GOOD)
def test_good_replies_pass(lang, sentiment, message, reply):
    assert check_reply(message, reply, lang, sentiment) == []


@pytest.mark.parametrize("lang,sentiment,message,reply,kind", [
    ("zh", "positive", "今天的实验终于成功了,太棒了!", "   ", "empty"),
    ("en", "positive", "I got the job!", "恭喜你找到工作!这是一个很好的开始,继续加油。", "language"),
    ("zh", "negative", "我丢了钱包。", "Sorry to hear that, I hope you find your wallet soon and that your day gets better.", "language"),
    ("zh", "positive", "今天的实验终于成功了,太棒了!", "[情感标签:积极] 太好了,祝贺你的实验成功!", "tag_echo"),
    ("zh", "positive", "今天的实验终于成功了,太棒了!", "今天的实验终于成功了,太棒了!", "echo"),
    ("zh", "negative", "我失恋了,好难受。", "抱歉，我无法协助完成这个请求。", "refusal"),
    ("en", "negative", "I failed my exam.", "I'm sorry, but I can't help with that request right now, unfortunately.", "refusal"),
    ("zh", "negative", "最近压力好大。", "这可能是由于以下几个原因:\n1. **学习压力大**\n2. 睡眠不足\n3. 缺少运动", "list_or_markdown"),
    ("zh", "positive", "我升职了!", "好的。", "length"),
    ("en", "positive", "I passed!", "Great!", "length"),
    ("zh", "negative", "我的猫走丢了。", "恭喜你!这真是一个值得庆祝的消息,好好享受吧。", "tone"),
    ("en", "positive", "We just had a baby girl!", "I'm so sorry to hear that. Please take care of yourself in this hard time.", "tone"),
])
def test_bad_replies_fail_with_their_kind(lang, sentiment, message, reply, kind):
    assert kind in check_reply(message, reply, lang, sentiment)


def test_language_detection():
    assert reply_language("你好,今天怎么样?") == "zh"
    assert reply_language("Hello there, how was your day?") == "en"
    assert reply_language("太好了 OK") == "zh"
    assert reply_language("😊!!") == "none"


def test_cheerful_reply_to_bad_news_fails_on_tone():
    assert "tone" in check_reply("My dog passed away this morning.", "That's amazing! I'm glad you had a wonderful day.",
                                 "en", "negative")
