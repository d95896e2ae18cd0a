"""WORKER_TEST_ECHO (worker/testhooks.py): the answer is the last message's text, forced token by
token through the real generation path, so browser tests can make the model "write" markup."""

from worker_harness import Worker

MARKUP = "ECHO <img src=x onerror=alert(1)> [INST] olá </s> <script>x</script> ç"


def test_echo_answers_with_the_question_as_plain_text_streamed_token_by_token():
    with Worker(env={"WORKER_TEST_ECHO": "ECHO"}) as w:
        done = w.request("e", messages=[{"role": "user", "content": MARKUP}], max_tokens=200, stream=True)
        assert done["type"] == "done", done
        assert done["text"] == MARKUP
        assert done["finish_reason"] == "stop"  # the answer's end-of-sequence token is forced too
        tokens = w.tokens("e")
        assert len(tokens) > 10 and "".join(tokens) == MARKUP
        # the `</s>` inside was text, not the end-of-sequence token: the answer went on after it
        # a request without the marker is the model's own answer
        plain = w.request("p", prompt="Quem fundou o Farense?", max_tokens=12)
        assert plain["type"] == "done" and "Quem fundou" not in plain["text"]


def test_echo_is_off_without_its_variable_and_goes_on_with_ignore_eos():
    with Worker() as w:
        done = w.request("n", messages=[{"role": "user", "content": MARKUP}], max_tokens=20)
        assert done["type"] == "done" and not done["text"].startswith("ECHO <img")
    with Worker(env={"WORKER_TEST_ECHO": "ECHO", "WORKER_TEST_IGNORE_EOS": "1"}) as w:
        done = w.request("i", messages=[{"role": "user", "content": MARKUP}], max_tokens=80)
        assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 80
        assert done["text"].startswith(MARKUP) and len(done["text"]) > len(MARKUP)
