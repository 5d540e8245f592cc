"""The README's settings table matches the code: every setting, its default and its description."""

from __future__ import annotations

import re
from pathlib import Path

from lookalike.settings import RECORDED_SETTINGS, default_text, describe_setting, settings_fields

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_default(field) -> str:
    text = default_text(field.name)
    if text is None:
        return "none"
    if field.name in {"img_size", "embedding_dim", "threads"}:
        return text
    if isinstance(field.default, int) and not isinstance(field.default, bool) and field.name != "port":
        return f"{field.default:,}"
    return f"`{text}`"


def readme_row(field) -> str:
    recorded = " (*recorded*)" if field.name in RECORDED_SETTINGS else ""
    return f"| `{field.name}` | {readme_default(field)} | {describe_setting(field.name)}{recorded} |"


def settings_table() -> str:
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    rows += [readme_row(f) for f in settings_fields()]
    return "\n".join(rows)


def test_readme_settings_table_matches_the_code():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| setting | default | meaning |") :].split("\n\n")[0]
    rows = [line for line in table.splitlines() if re.match(r"^\| `[a-z_]+` \|", line)]
    documented = {re.match(r"^\| `([a-z_]+)`", line).group(1): line for line in rows}
    for field in settings_fields():
        assert field.name in documented, f"README lacks a row for setting {field.name}: {readme_row(field)}"
        assert documented[field.name] == readme_row(field), (
            f"README row of {field.name} differs from the code; expected\n{readme_row(field)}"
        )


if __name__ == "__main__":  # prints the table to paste into the README
    print(settings_table())
