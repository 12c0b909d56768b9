"""The web chat page in headless Chromium against a real server and the real SmolLM2: Markdown
(sanitized), settings, conversations kept across reloads, copy, regenerate, tokens/s, and an
answer that is only reasoning. (tests/test_server.py drives streaming and the stop button.)

Where the real model cannot produce a case (Markdown with a script in it, a reasoning-only
answer), the page's own fetch is wrapped in the browser to answer with those events; the page
code under test is unchanged. THRIFTY_SCREENSHOT_DIR, if set, keeps the screenshots (the
README's come from here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from test_server import CHROMEDRIVER, CHROMIUM, MODEL, launch

from thrifty import hub
from thrifty.config import resolve_dtype
from thrifty.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

# Replaces the next /v1/chat/completions answer with these SSE events; every request body
# sent is kept in window.sent.
FAKE_NEXT = """
window.sent = window.sent || [];
if (!window.realFetch) {
  window.realFetch = window.fetch;
  window.fetch = (url, init) => {
    if (String(url).endsWith('/v1/chat/completions')) {
      window.sent.push(JSON.parse(init.body));
      if (window.fakeEvents) {
        const events = window.fakeEvents;
        window.fakeEvents = null;
        const text = events.map((e) => 'data: ' + JSON.stringify(e) + '\\n\\n').join('')
          + 'data: [DONE]\\n\\n';
        return Promise.resolve(new Response(text, {status: 200,
          headers: {'Content-Type': 'text/event-stream'}}));
      }
    }
    return window.realFetch(url, init);
  };
}
window.fakeEvents = arguments[0];
"""


SERVED = "smol"  # --served-model-name
# SmolLM2's template with another default system message: --chat-template
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a pirate. Answer like one.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chunk(**delta) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "pirate.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(smollm2_gguf, template_file):
    procs: list = []
    # No prefix cache: a cached prefix changes the logits' last bits, and the defaults test
    # compares seeded samples of the same prompt.
    args = ["--max-model-len", "1024", "--num-threads", "2", "--served-model-name", SERVED,
            "--no-prefix-caching"]  # fmt: skip
    with launch(*args, "--chat-template", str(template_file), procs=procs) as url:
        yield url, procs[0]


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


def server_log(server) -> str:
    return b"".join(server[1].log).decode(errors="replace")


def test_requests_that_omit_sampling_fields_get_the_models_defaults(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    poem = [{"role": "user", "content": "Write a poem about the sea."}]

    def ask(seed: int = 11, **fields) -> str:
        c = client.chat.completions.create(
            model=SERVED, messages=poem, max_tokens=32, seed=seed, **fields
        )
        return c.choices[0].message.content

    # SmolLM2's converted checkpoint sets none: thrifty's defaults (0.7, 0.9, no penalty).
    omitted = ask()
    explicit = ask(temperature=0.7, top_p=0.9, extra_body={"repetition_penalty": 1.0})
    assert omitted == explicit
    assert omitted != ask(temperature=1.0, top_p=1.0)  # the OpenAI defaults
    greedy = ask(temperature=0)  # 0 stays greedy
    assert greedy == ask(temperature=0, seed=12)


def test_a_response_reports_the_sampling_it_used(url):
    """The Responses object names the values a request was sampled with: the model's defaults
    for the fields it left out, not the protocol's 1.0."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    r = client.responses.create(model=SERVED, input="Hi", max_output_tokens=2)
    assert (r.temperature, r.top_p) == (0.7, 0.9)  # SmolLM2's conversion names none
    r = client.responses.create(model=SERVED, input="Hi", max_output_tokens=2, temperature=0)
    assert (r.temperature, r.top_p) == (0, 0.9)


def test_the_chat_template_flag_replaces_the_models(url, template_file):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Who are you?"}]
    c = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=1)
    tokenizer = Tokenizer.from_dir(hub.resolve("smollm2-135m-instruct", progress=False))
    default = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    tokenizer.use_chat_template(template_file.read_text())
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert "pirate" in text
    assert c.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    assert c.usage.prompt_tokens != len(default)


def test_ps_says_what_the_server_has_loaded_and_each_request_is_logged(server):
    url, _ = server
    thrifty = [sys.executable, "-m", "thrifty", "ps"]
    ps = subprocess.run([*thrifty, "--url", url], capture_output=True, text=True, timeout=60)
    assert ps.returncode == 0, ps.stderr
    header, row = ps.stdout.splitlines()
    assert header.split()[:2] == ["MODEL", "SIZE"]
    dtype = str(resolve_dtype("auto", hub.resolve(MODEL, progress=False), "cpu")).split(".")[1]
    assert row.split()[0] == SERVED and f"cpu {dtype}" in row and " 1024 " in row
    assert " bfloat16 " in row  # the KV cache: bfloat16 for a GGUF model on any CPU
    deadline = time.monotonic() + 10
    while '"GET /thrifty/status" 200' not in server_log(server):
        assert time.monotonic() < deadline, server_log(server)[-2000:]
        time.sleep(0.05)
    down = subprocess.run(
        [*thrifty, "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60
    )
    assert down.returncode == 1 and down.stderr.count("\n") == 1
    assert down.stderr.startswith("error: no thrifty server at http://127.0.0.1:9")


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_features(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = Path(os.environ.get("THRIFTY_SCREENSHOT_DIR", tmp_path))

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    def finds(css):
        return browser.find_elements(By.CSS_SELECTOR, css)

    def until(check, timeout=180.0):  # generous: a busy 2-core machine streams slowly
        deadline = time.monotonic() + timeout
        while not (value := check()):
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
        return value

    def send(text):
        n = len(finds(".assistant"))
        find("#input").send_keys(text, Keys.ENTER)
        until(lambda: len(finds(".assistant")) > n and find("#send").is_enabled())
        return finds(".assistant")[n]

    def fake(events):
        browser.execute_script(FAKE_NEXT, events)

    browser.get(f"{url}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    until(lambda: find("#model").text == SERVED)

    # Settings go with the request: greedy, at most 12 tokens.
    find("#settings summary").click()
    find("#temperature").send_keys("0", Keys.TAB)
    find("#max-tokens").send_keys("12", Keys.TAB)
    find("#system").send_keys("You are terse.", Keys.TAB)
    fake(None)  # only records what is sent
    first = send("What is the capital of France?")
    sent = browser.execute_script("return window.sent")[-1]
    assert sent["temperature"] == 0 and sent["max_tokens"] == 12
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    answer = first.find_element(By.CSS_SELECTOR, ".answer").text
    assert answer.strip()
    stats = first.find_element(By.CSS_SELECTOR, ".stats").text
    tokens, _, rate = stats.partition(" tokens, ")
    assert 1 <= int(tokens) <= 12 and rate.endswith(" tokens/s") and float(rate.split()[0]) > 0

    # Copy puts the answer's text on the clipboard.
    first.find_element(By.CSS_SELECTOR, ".copy").click()
    until(lambda: first.find_element(By.CSS_SELECTOR, ".copy").text == "Copied")

    # Regenerate asks again for the same question: greedy, the same answer, one question shown.
    first.find_element(By.CSS_SELECTOR, ".regenerate").click()
    until(lambda: find("#send").is_enabled() and len(finds(".assistant .stats")) == 1)
    assert [e.text for e in finds(".user")] == ["What is the capital of France?"]
    assert finds(".assistant .answer")[0].text == answer
    assert browser.execute_script("return window.sent")[-1]["messages"] == sent["messages"]

    # Markdown is rendered, and what could run is removed (DOMPurify; the CSP forbids it too).
    hostile = (
        "Here is **bold** and `code`:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n"
        '| 1 | 2 |\n\n<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
        "[link](javascript:window.pwned=3)"
    )
    fake([chunk(role="assistant"), chunk(content=hostile)])
    md = send("Show me some Markdown.")
    assert md.find_element(By.CSS_SELECTOR, ".answer strong").text == "bold"
    assert md.find_element(By.CSS_SELECTOR, ".answer pre code").text == "print('hi')"
    assert md.find_element(By.CSS_SELECTOR, ".answer td").text == "1"
    assert not md.find_elements(By.CSS_SELECTOR, ".answer script, .answer [onerror]")
    for link in md.find_elements(By.CSS_SELECTOR, ".answer a"):
        assert not (link.get_attribute("href") or "").startswith("javascript:")
    assert browser.execute_script("return window.pwned") is None
    # The fake answer went into the conversation: it is sent back with the next question.
    fake([chunk(role="assistant"), chunk(reasoning_content="Let me think about it...")])
    thought = send("Think, but do not answer.")
    assert "Let me think" in thought.find_element(By.CSS_SELECTOR, ".reasoning").text
    # An answer that is only reasoning keeps its question in the conversation.
    fake(None)
    send("Now answer: what is 2+2?")
    roles = [(m["role"], m["content"]) for m in browser.execute_script("return window.sent")[-1]
             ["messages"]]  # fmt: skip
    assert ("user", "Think, but do not answer.") in roles
    assert ("assistant", hostile) in roles
    assert not any(r == "assistant" and "Let me think" in c for r, c in roles)  # not fed back
    browser.save_screenshot(str(shots / "chat_page.png"))

    # A reload keeps the conversation, the settings and the list; a new chat starts empty.
    users = [e.text for e in finds(".user")]
    browser.refresh()
    until(lambda: find("#model").text == SERVED)
    assert [e.text for e in finds(".user")] == users
    assert finds(".assistant .answer strong")[0].text == "bold"
    assert find("#temperature").get_attribute("value") == "0"
    assert find("#max-tokens").get_attribute("value") == "12"
    find("#reset").click()
    until(lambda: not finds(".msg"))
    send("Hello!")
    titles = [e.text for e in finds("#conversations .open")]
    assert titles == ["Hello!", "What is the capital of France?"]
    finds("#conversations .open")[1].click()
    until(lambda: [e.text for e in finds(".user")] == users)
    stored = json.loads(browser.execute_script("return localStorage['thrifty-conversations']"))
    assert len(stored) == 2
    find("#settings summary").click()
    browser.save_screenshot(str(shots / "chat_page_settings.png"))
    # Deleting a conversation removes it from the list and from storage.
    finds("#conversations .delete")[0].click()
    until(lambda: len(finds("#conversations .open")) == 1)
    stored = json.loads(browser.execute_script("return localStorage['thrifty-conversations']"))
    assert [c["title"] for c in stored] == ["What is the capital of France?"]
