"""The web viewer in a real headless browser: Debian's chromium driven by its
chromium-driver (selenium), one browser for the module, on the app served by uvicorn in
this process on a real store file.

Without chromium these tests are skipped with a reason saying what to install, unless
AISOPOD_REQUIRE_BROWSER=1 (set by .ci/run), where they fail instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from aisopod_session import SessionRepository, open_database
from aisopod_session.viewer import create_app
from tests.viewer_screenshots import browser_programs, chromium, take_screenshots
from tests.viewer_server import HOSTILE_TEXT, TOOL_RESULT, Seeded, seed, serving

pytestmark = pytest.mark.browser

BULK = 25


@pytest.fixture(scope="module")
def driver() -> Iterator[webdriver.Chrome]:
    programs = browser_programs()
    if programs is None:
        reason = (
            "NO BROWSER: the viewer's browser tests need Debian's chromium and "
            "chromium-driver (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("AISOPOD_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; AISOPOD_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(reason)
    with chromium(programs) as session:
        yield session


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Seeded]]:
    engine = open_database(tmp_path_factory.mktemp("browser") / "sessions.db")
    try:
        seeded = seed(SessionRepository(engine), bulk=BULK)
        with serving(create_app(SessionRepository(engine))) as base:
            yield base, seeded
    finally:
        engine.dispose()


def texts(driver: webdriver.Chrome, selector: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, selector)]


def follow(driver: webdriver.Chrome, element: WebElement) -> None:
    """Click a link or button that loads a page, and wait until the new page replaced the
    old (a click returns before a form's page has loaded; reading on would find the old
    page's elements gone stale). While the page changes, asking about the old element
    may also fail with chromium's "Node with given id does not belong to the document"
    (a plain `WebDriverException`, seen in CI): that is asked again."""
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(old)
    )


def test_the_pages_load_and_link_to_each_other(
    driver: webdriver.Chrome, served: tuple[str, Seeded]
) -> None:
    base, seeded = served
    driver.get(base + "/")
    assert driver.find_element(By.ID, "session-count").text == str(seeded.sessions)
    follow(driver, driver.find_element(By.LINK_TEXT, "Sessions"))
    assert driver.title == "Sessions · aisopod-session"
    # The stylesheet loaded (the Content-Security-Policy allows it): the header is dark.
    header = driver.find_element(By.TAG_NAME, "header")
    assert header.value_of_css_property("background-color") == "rgba(29, 35, 48, 1)"
    follow(driver, driver.find_element(By.LINK_TEXT, "Search"))
    assert driver.find_element(By.TAG_NAME, "h1").text == "Search"


def test_the_filter_form_and_the_pages_of_a_list(
    driver: webdriver.Chrome, served: tuple[str, Seeded]
) -> None:
    base, _ = served
    driver.get(base + "/sessions")
    driver.find_element(By.NAME, "agent_id").send_keys("pager")
    Select(driver.find_element(By.NAME, "peer_kind")).select_by_visible_text("thread")
    Select(driver.find_element(By.ID, "per-page")).select_by_visible_text("10")
    follow(driver, driver.find_element(By.ID, "apply"))
    pages = []
    while True:
        keys = texts(driver, "#sessions td.key")
        assert all(key.startswith("pager:discord:guild-42:thread:") for key in keys)
        pages.append(keys)
        # The form shows the filter the page was asked for.
        assert driver.find_element(By.NAME, "agent_id").get_attribute("value") == "pager"
        following = driver.find_elements(By.ID, "next-page")
        if not following:
            break
        follow(driver, following[0])
    assert [len(page) for page in pages] == [10, 10, BULK - 20]
    assert len({key for page in pages for key in page}) == BULK
    follow(driver, driver.find_element(By.ID, "first-page"))
    assert texts(driver, "#sessions td.key") == pages[0]


def test_a_transcript_shows_a_tool_call_and_its_result(
    driver: webdriver.Chrome, served: tuple[str, Seeded]
) -> None:
    base, _ = served
    driver.get(base + "/sessions?agent_id=concierge&peer_id=1001")
    follow(driver, driver.find_element(By.LINK_TEXT, "concierge:telegram:bot-main:dm:1001"))
    calls = texts(driver, ".tool-call")
    assert any("get_weather" in call and '"city": "Oslo"' in call for call in calls)
    assert any("get_forecast" in call and '"units": "metric"' in call for call in calls)
    results = texts(driver, ".tool-result")
    assert results == ["tool result toolu_2\nSunny tomorrow"]
    tool = driver.find_element(By.CSS_SELECTOR, ".role-tool")
    assert "result of call_1" in tool.text
    assert TOOL_RESULT in tool.text


def test_hostile_text_is_shown_as_text_and_runs_nothing(
    driver: webdriver.Chrome, served: tuple[str, Seeded]
) -> None:
    base, seeded = served
    driver.get(base + f"/sessions/{seeded.hostile_id}")
    shown = driver.find_element(By.CSS_SELECTOR, ".role-user .text").text
    visible = HOSTILE_TEXT.replace("\x1b", "\\x1b").replace(
        "\u202e", "\\u202e"
    )  # control characters as their escapes
    assert shown == visible
    assert "<b>mallory</b>" in driver.find_element(By.ID, "session-key").text
    assert "<script>alert(3)</script>" in driver.find_element(By.CSS_SELECTOR, ".tool-call").text
    assert driver.execute_script("return window.pwned === undefined") is True
    assert driver.execute_script("return document.scripts.length") == 0
    assert driver.execute_script("return document.images.length") == 0
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.accept()


def test_search_from_the_form(driver: webdriver.Chrome, served: tuple[str, Seeded]) -> None:
    base, _ = served
    driver.get(base + "/search")
    driver.find_element(By.ID, "q").send_keys("forecast")
    follow(driver, driver.find_element(By.ID, "search"))
    assert texts(driver, "#hits mark") == ["forecast"]
    follow(driver, driver.find_element(By.CSS_SELECTOR, "#hits td.key a"))
    assert "Checking the forecast too." in driver.find_element(By.ID, "transcript").text


def test_the_screenshots_of_the_docs_are_taken(
    driver: webdriver.Chrome, served: tuple[str, Seeded], tmp_path: Path
) -> None:
    base, seeded = served
    written = take_screenshots(driver, base, seeded, tmp_path)
    assert [path.name for path in written] == [
        "viewer-sessions.png",
        "viewer-transcript.png",
        "viewer-search.png",
        "viewer-hostile.png",
    ]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
