"""A report page in a real headless Chromium (Debian's `chromium` package): what it renders, measured in the page
after it loaded, and a screenshot. Nothing is fetched: the page is a local file and the browser's background
services are off."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--force-device-scale-factor=1"]  # fmt: skip

# Run in the page once it has loaded; the result goes into <body data-check>, which --dump-dom prints.
CHECKS = """
<script>
function charBox(node, offset) {
  const range = document.createRange();
  range.setStart(node, offset);
  range.setEnd(node, offset + 1);
  return range.getBoundingClientRect();
}
function textNodes(element) {
  const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT), nodes = [];
  while (walker.nextNode()) if (walker.currentNode.length) nodes.push(walker.currentNode);
  return nodes;
}
window.addEventListener("load", () => {
  const images = [...document.querySelectorAll("#lines td.image img")];
  const seen = {
    lines: document.querySelectorAll("#lines tr.line").length,
    images: {count: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
             shown: images.filter(i => i.getBoundingClientRect().width > 0).length},
    marks: {sub: 0, ins: 0, del: 0, coloured: 0},
    rtl: {texts: 0, right_to_left: 0},
  };
  for (const kind of ["sub", "ins", "del"]) {
    for (const mark of document.querySelectorAll(`#lines .text .${kind}`)) {
      const box = mark.getBoundingClientRect();
      if (box.width > 0 && box.height > 0) seen.marks[kind]++;
      if (getComputedStyle(mark).backgroundColor !== "rgba(0, 0, 0, 0)") seen.marks.coloured++;
    }
  }
  for (const text of document.querySelectorAll("#lines .text")) {
    const nodes = textNodes(text);
    if (!nodes.length) continue;
    seen.rtl.texts++;
    const first = charBox(nodes[0], 0), last = charBox(nodes.at(-1), nodes.at(-1).length - 1);
    const firstX = first.left + first.width / 2, lastX = last.left + last.width / 2;
    if (getComputedStyle(text).direction === "rtl" && firstX > lastX) seen.rtl.right_to_left++;
  }
  document.body.setAttribute("data-check", JSON.stringify(seen));
});
</script>
"""


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)


def run(browser: str, profile: Path, *args: str) -> str:
    done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return done.stdout


def browser_checks(browser: str, page: Path, profile: Path) -> dict:
    """What the loaded page shows: line rows, images (decoded, laid out), marks (with a box, coloured) and texts
    laid out right to left (direction rtl, first character to the right of the last)."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECKS + "</body>"), encoding="utf-8")
    dom = run(browser, profile, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, dom[:2000]
    return json.loads(unescape(found.group(1)))


def screenshot(browser: str, page: Path, target: Path, profile: Path, size: str = "1280,2200") -> Path:
    run(browser, profile, f"--screenshot={target}", f"--window-size={size}", page.as_uri())
    return target
