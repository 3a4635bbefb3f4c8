"""mkdocs hooks (`hooks:` in mkdocs.yml).

- `on_pre_build`: regenerate `docs/configuration.md` from `FlowGRPOConfig` (`docs/gen_config_reference.py`), so the
  published configuration reference can never go stale. The file is only rewritten when its text changes, so
  `mkdocs serve` does not rebuild in a loop.
- `on_files` / `on_page_markdown`: the pages link to files outside `docs/` with relative links such as
  `../examples/sd35_ocr.yaml` or `../benchmarks/.../reward_curve.png`, which work when the Markdown is read on
  GitHub or in an editor. The site copies those files under `repo/` and rewrites the links to them; a link to a
  folder (`../examples`) becomes its plain text. A link to a file that does not exist is left alone, so the strict
  build still reports it.
"""

import importlib.util
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
PREFIX = "repo"  # where the site serves files from outside docs/
# [text](../path) and ![alt](../path), with an optional #anchor.
_OUTSIDE_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<path>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config, **kwargs):
    _load_generator().write()


def _target(page_src_uri: str, link: str) -> Path | None:
    """The repository path a `../` link of a page points to, if it is outside docs/ but inside the repository."""
    path = (DOCS / posixpath.dirname(page_src_uri) / link).resolve()
    try:
        path.relative_to(DOCS)
        return None  # inside docs/: mkdocs handles it
    except ValueError:
        pass
    try:
        path.relative_to(ROOT)
    except ValueError:
        return None
    return path


def _markdown_pages(files):
    for file in files:
        if file.src_uri.endswith(".md") and file.abs_src_path:
            yield file


def on_files(files, config, **kwargs):
    for page in list(_markdown_pages(files)):
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for match in _OUTSIDE_LINK.finditer(text):
            target = _target(page.src_uri, match["path"])
            if target is None or not target.is_file():
                continue
            src_uri = f"{PREFIX}/{target.relative_to(ROOT).as_posix()}"
            if files.get_file_from_path(src_uri) is None:
                files.append(File.generated(config, src_uri, abs_src_path=str(target)))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    def rewrite(match):
        target = _target(page.file.src_uri, match["path"])
        if target is None or not target.exists():
            return match[0]
        if target.is_dir():
            return match["text"]
        src_uri = f"{PREFIX}/{target.relative_to(ROOT).as_posix()}"
        url = posixpath.relpath(src_uri, posixpath.dirname(page.file.src_uri) or ".")
        return f"{match['bang']}[{match['text']}]({url}{match['anchor'] or ''})"

    return _OUTSIDE_LINK.sub(rewrite, markdown)
