"""Result scripts' markdown sections."""

from __future__ import annotations

from diffopt.report import machine_description, write_section


def test_write_section_appends_then_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nhand-written intro\n")
    write_section(path, "a", "Table A", "first A")
    write_section(path, "b", "Table B", "only B")
    write_section(path, "a", "Table A", "second A\nwith two lines")
    text = path.read_text()
    assert text.startswith("# Results\n\nhand-written intro\n")
    assert "first A" not in text and "second A\nwith two lines" in text and "only B" in text
    assert text.count("## Table A") == 1 and text.index("## Table A") < text.index("## Table B")
    assert text.count("<!-- a:start -->") == 1 and text.count("<!-- a:end -->") == 1


def test_write_section_creates_the_file(tmp_path):
    write_section(tmp_path / "BENCHMARKS.md", "x", "X", "body")
    assert (tmp_path / "BENCHMARKS.md").read_text().startswith("# Benchmarks\n\n## X\n")


def test_machine_description_names_cores():
    assert machine_description().endswith(" cores")
