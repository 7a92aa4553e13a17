"""The playground page in real headless Chromium, driven over WebDriver.

Usage: python tests/playground.py ROOT_URL KEYED_ROOT_URL KEY SCREENSHOT.png
ROOT_URL serves without keys, KEYED_ROOT_URL with --api-key KEY. Needs
Debian's chromium and chromium-driver and the selenium package
(scripts/test.sh installs them).
"""

import json
import subprocess
import sys

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

root, keyed_root, key, screenshot = sys.argv[1:5]
BASE = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = "What is the capital of France?"


def browser(width=1280, height=1000):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait(driver, condition, seconds=60, what="condition"):
    return WebDriverWait(driver, seconds).until(lambda d: condition(d), message=f"timed out waiting for {what}")


def js_errors(driver):
    """Errors the page's scripts raised or logged (failed requests are the network's)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]


def ready(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", what="the page to load")


def run_compare(driver):
    driver.find_element(By.ID, "compare-run").click()
    columns = driver.find_elements(By.CSS_SELECTOR, "#columns .column")
    wait(driver, lambda d: all(c.get_attribute("data-state") in ("done", "failed") for c in columns), 120, "the replies")
    return columns


def chat_api(base_url, body, headers=None):
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers or {}, timeout=60).json()
    return reply["choices"][0]["message"]["content"]


driver = browser()
try:
    ready(driver, f"{root}/")

    # Compare: base, pirate and pirate-chat on one question, same seed.
    models = [Select(driver.find_element(By.ID, f"col-{n}-model")).first_selected_option.get_attribute("value") for n in (1, 2, 3)]
    assert models == [BASE, "pirate", "pirate-chat"], models
    columns = run_compare(driver)
    replies = [driver.find_element(By.ID, f"col-{n}-reply").text for n in (1, 2, 3)]
    assert all(c.get_attribute("data-state") == "done" for c in columns), replies
    assert not replies[0].startswith("Arr matey!") and replies[0], replies
    assert replies[1].startswith("Arr matey!") and replies[2].startswith("Arr matey!"), replies
    for n in (1, 2, 3):
        stats = driver.find_element(By.ID, f"col-{n}-stats").text
        assert "first token" in stats and "tok/s" in stats, stats
    # Each column streamed exactly what the API answers for its request.
    bodies = driver.execute_script("return compareBodies()")
    for body, reply in zip(bodies, replies):
        assert chat_api(root, body) == reply, (body, reply)
    driver.save_screenshot(screenshot)
    print("compare: base, pirate, pirate-chat streamed side by side; the pirates say", repr(replies[1][:40]))

    # Copy as curl / Python: the copied text runs and gets the same reply.
    curl = driver.execute_script("return asCurl(compareBodies()[1])")
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == replies[1], out
    python = driver.execute_script("return asPython([compareBodies()[2]])")
    out = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, check=True).stdout
    assert out.strip() == replies[2].strip(), (out, replies[2])
    driver.find_element(By.ID, "compare-curl").click()
    wait(driver, lambda d: "copied" in d.find_element(By.ID, "status").text, 10, "the copy")
    print("copy as curl and as Python: both run and answer the same")

    # A composition in a fourth column: the base with two weighted adapters.
    driver.find_element(By.ID, "compare-add").click()
    Select(driver.find_element(By.ID, "col-4-model")).select_by_value(BASE)
    driver.find_element(By.ID, "col-4-adapters").send_keys("pirate:0.7, shout:0.5")
    bodies = driver.execute_script("return compareBodies()")
    assert bodies[3]["adapters"] == [{"name": "pirate", "weight": 0.7}, {"name": "shout", "weight": 0.5}], bodies[3]
    columns = run_compare(driver)
    composed = driver.find_element(By.ID, "col-4-reply").text
    assert columns[3].get_attribute("data-state") == "done" and composed, composed
    assert chat_api(root, bodies[3]) == composed, (bodies[3], composed)
    driver.find_element(By.ID, "compare-remove").click()
    print("compare: a composition of pirate 0.7 and shout 0.5 in a column says", repr(composed[:40]))

    # Prompt view: the summarize template, its variables, the exact rendering.
    tab = driver.find_element(By.ID, "tab-compare")
    tab.send_keys(Keys.ARROW_RIGHT)  # keyboard: the next tab
    assert driver.find_element(By.ID, "tab-prompt").get_attribute("aria-selected") == "true"
    Select(driver.find_element(By.ID, "prompt-template")).select_by_value("summarize")
    text = driver.find_element(By.ID, "prompt-var-text")
    text.clear()
    text.send_keys("Cats sleep for most of the day. They wake up at night to play.")
    driver.find_element(By.ID, "prompt-render").click()
    wait(driver, lambda d: d.find_element(By.ID, "prompt-count").text != "–", 30, "the rendering")
    expected = httpx.post(
        f"{root}/v1/templates/summarize/render",
        json={
            "model": BASE,
            "mode": "chat",
            "template_vars": {"text": "Cats sleep for most of the day. They wake up at night to play.", "sentences": 2},
        },
    ).json()
    assert driver.find_element(By.ID, "prompt-count").text == str(expected["count"]), expected["count"]
    shown = driver.find_element(By.ID, "prompt-text").get_attribute("textContent")
    assert shown == expected["prompt"], (shown, expected["prompt"])
    assert "Summarize" in driver.find_element(By.ID, "prompt-description").text
    print("prompt: the summarize rendering and its", expected["count"], "tokens equal the render route's")

    # Chat: a streamed reply.
    driver.find_element(By.ID, "tab-chat").click()
    Select(driver.find_element(By.ID, "chat-model")).select_by_value("pirate")
    temperature = driver.find_element(By.ID, "chat-temperature")
    temperature.clear()
    temperature.send_keys("0")
    box = driver.find_element(By.ID, "chat-input")
    box.send_keys(QUESTION)
    box.send_keys(Keys.ENTER)
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-state='done']"), 60, "the chat reply")
    answer = driver.find_element(By.CSS_SELECTOR, ".message.assistant .text").text
    assert answer.startswith("Arr matey!"), answer
    print("chat: streamed", repr(answer[:40]))

    # Adapters and presets: the list from /v1/models with parents.
    driver.find_element(By.ID, "tab-models").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models-body tr")) >= 5, 10, "the model list")
    rows = {r.find_element(By.TAG_NAME, "th").text: r.text for r in driver.find_elements(By.CSS_SELECTOR, "#models-body tr")}
    assert "adapter" in rows["pirate"] and "preset" in rows["pirate-chat"] and BASE in rows["pirate"], rows

    # Live: the chart's data comes from /metrics.
    driver.find_element(By.ID, "tab-live").click()
    wait(driver, lambda d: d.execute_script("return live.samples.length") >= 1, 15, "metrics samples")
    errors = js_errors(driver)
    assert not errors, errors
finally:
    driver.quit()

# With --api-key: the page asks for the key (a wrong one is refused), then works.
driver = browser()
try:
    driver.get(f"{keyed_root}/")
    dialog = driver.find_element(By.ID, "key-dialog")
    wait(driver, lambda d: dialog.get_attribute("open") is not None, 10, "the key dialog")
    driver.find_element(By.ID, "key-input").send_keys("sk-wrong")
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, lambda d: "refused" in d.find_element(By.ID, "key-error").text, 10, "the refusal")
    driver.find_element(By.ID, "key-input").send_keys(key)
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 30, "the page with the key")
    columns = run_compare(driver)
    assert all(c.get_attribute("data-state") == "done" for c in columns)
    pirate = driver.find_element(By.ID, "col-2-reply").text
    assert pirate == chat_api(keyed_root, driver.execute_script("return compareBodies()[1]"), {"authorization": f"Bearer {key}"})
    assert driver.execute_script("return sessionStorage.getItem('tailor-api-key')") == key
    errors = js_errors(driver)
    assert not errors, errors
    print("api key: asked for, a wrong key refused, then the page works")
finally:
    driver.quit()

# A phone-width window: nothing wider than the screen.
driver = browser(390, 844)
try:
    ready(driver, f"{root}/")
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow}px wider than a phone"
    assert not js_errors(driver)
    print("phone width: no horizontal overflow")
finally:
    driver.quit()
print("playground: ok")
