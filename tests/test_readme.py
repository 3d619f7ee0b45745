"""The README as a user meets it: its own-loop example runs, and every command its code blocks (and those of
docs/) show parses."""

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from edropout.experiments.cli import parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str, language: str):
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def test_the_first_screen_holds_the_commands_and_the_example():
    lines = (ROOT / "README.md").read_text().splitlines()
    first = "\n".join(lines[:60])
    assert "make train" in first and "make test" in first and "edropout.prune(ed, optimizer)" in first
    assert len(lines) < 620  # about half of what it was (1,229 lines before 2026-11-30)


def test_the_own_loop_example_runs_and_saves_a_slim_network(tmp_path, monkeypatch, gen):
    text = (ROOT / "README.md").read_text()
    example = _blocks(text[text.index("## Prune your own model"):], "python")[0]
    assert len(example.strip().splitlines()) <= 25
    batches = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(10, (8,), generator=gen)) for _ in range(3)]
    monkeypatch.chdir(tmp_path)
    namespace = {"loader": batches, "epochs": 2}
    exec(compile(example, "README.md", "exec"), namespace)
    ed, pruned, small = namespace["ed"], namespace["pruned"], namespace["small"]
    assert ed.frozen and pruned is not None and (tmp_path / "slim.pt").is_file()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in ed.model.parameters())
    pruned.model.eval()
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small(x), pruned.model(x))


def _commands(page: Path):
    """(page, argument list) of each command line in the page's sh blocks and of each inline code span that
    is a command (`edropout ...`, `python -m edropout ...`, `python benchmarks/...`); continuations joined,
    comments and environment assignments dropped."""
    text = page.read_text()
    spans = [m for m in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
             if re.match(r"(python -m edropout (train|eval|export)|edropout (train|eval|export)|python benchmarks/)", m)]
    for block in _blocks(text, "sh") + spans:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#") or "[" in line or "..." in line:  # a comment, a synopsis
                continue
            words = shlex.split(line)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            yield page, words


def test_every_command_shown_parses(capsys):
    checked, failed = 0, []
    for page, words in (c for page in PAGES for c in _commands(page)):
        if "edropout" in words or "-m" in words and "edropout" in words[words.index("-m") + 1:words.index("-m") + 2]:
            at = words.index("edropout")
            args = words[at + 1:]
            if len(args) == 1:  # the name of a command in the text, not a command line
                continue
            try:
                parser().parse_args(args)
            except SystemExit:
                failed.append(f"{page.name}: `{' '.join(words)}` does not parse")
            checked += 1
        elif len(words) > 1 and words[0] == "python" and words[1].startswith("benchmarks/"):
            script = ROOT / words[1]
            if not script.is_file():
                failed.append(f"{page.name}: {words[1]} does not exist")
                continue
            source = script.read_text()
            failed += [f"{page.name}: {words[1]} has no option {flag}"
                       for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")) if f'"{flag}"' not in source]
            checked += 1
    assert not failed, "\n".join(failed)
    assert checked >= 20


def test_every_link_to_a_file_resolves():
    for page in PAGES + [ROOT / "benchmarks" / "results" / "fashion-resnet18-controls-2026-11-30" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"
