"""A headless chromium (Debian's, driven by its chromium-driver through selenium) for the
viewer's browser tests, and the screenshots in docs/viewer.md, taken the same way:

    .venv/bin/python -m tests.viewer_screenshots [FOLDER]    # default: docs/

writes viewer-sessions.png, viewer-transcript.png, viewer-search.png and
viewer-hostile.png there, of a store filled by `tests.viewer_server.seed`."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from aisopod_session import SessionRepository, open_database
from aisopod_session.viewer import create_app
from tests.viewer_server import Seeded, seed, serving

WIDTH, HEIGHT = 1000, 1000


def browser_programs() -> tuple[str, str] | None:
    """Where Debian's chromium and chromium-driver are, or None if either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return None if browser is None or driver is None else (browser, driver)


@contextmanager
def chromium(programs: tuple[str, str]) -> Iterator[webdriver.Chrome]:
    """A headless chromium for the block, driven through the installed driver (selenium
    downloads nothing when it is given both programs)."""
    browser, driver = programs
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: chromium's sandbox cannot start there
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()


def take_screenshots(
    driver: webdriver.Chrome, base: str, seeded: Seeded, folder: Path
) -> list[Path]:
    """The sessions list, a transcript with tool calls, a search and the hostile
    session's transcript, as PNGs in `folder`."""
    shots = {
        "viewer-sessions.png": "/sessions?limit=10",
        "viewer-transcript.png": f"/sessions/{seeded.weather_id}",
        "viewer-search.png": "/search?q=oslo",
        "viewer-hostile.png": f"/sessions/{seeded.hostile_id}",
    }
    written = []
    for name, path in shots.items():
        driver.get(base + path)
        target = folder / name
        if not driver.save_screenshot(str(target)):
            raise RuntimeError(f"chromium took no screenshot of {path}")
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    """Write the docs' screenshots into argv[0] (default docs/)."""
    folder = Path(argv[0]) if argv else Path(__file__).parent.parent / "docs"
    programs = browser_programs()
    if programs is None:
        print("needs chromium and chromium-driver: apt-get install chromium chromium-driver")
        return 1
    with tempfile.TemporaryDirectory() as work:
        engine = open_database(Path(work) / "sessions.db")
        try:
            repo = SessionRepository(engine)
            seeded = seed(repo, bulk=8)
            with serving(create_app(repo)) as base, chromium(programs) as driver:
                for path in take_screenshots(driver, base, seeded, folder):
                    print(f"wrote {path}")
        finally:
            engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
