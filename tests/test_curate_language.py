"""The curate stage's language step (py3langid, its model bundled in the wheel): on a planted
corpus of English paragraphs and a few German, French, Spanish and Russian ones, the others go to
removed/language/ with the language found and its score, the English ones stay; 2 parts give the
bytes of 1; a recipe without the step keeps its config (and so its fingerprint); bad options are
one line from --dry-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_prep.curate import Config
from data_prep.curate_options import LanguageOptions
from data_prep.curate_steps import identify_language
from pipeline.engine.config import validate_recipe
from pipeline.engine.graph import fingerprints
from tests.helpers import run_in_process
from tests.test_curate import read_shards, recipe, removed
from tests.test_curate_e2e import export_files

ENGLISH = [
    "The river rose quickly after three days of rain, and the farmers moved their animals to "
    "higher ground. By the evening the old bridge was under water. Nobody in the village could "
    "remember a flood like this one, although the oldest people said their parents had told "
    "stories about it.",
    "A good recipe for bread needs only flour, water, salt and yeast. The dough should rest for "
    "several hours so that the flavour can develop. Bake it in a very hot oven until the crust "
    "is dark brown and the loaf sounds hollow when you knock on the bottom.",
    "The committee met on Tuesday to discuss the budget for next year. Most members agreed that "
    "the library needed more money for new books and longer opening hours. The final decision "
    "will be taken at the next meeting, after the public has had a chance to comment.",
    "Learning to play the piano takes patience. Beginners should practise a little every day "
    "instead of a lot once a week. It also helps to listen carefully to good recordings, because "
    "the ear has to learn what the hands are trying to do.",
    "The train was late again this morning, so I missed the first part of the lecture. The "
    "professor was explaining how stars are born inside huge clouds of gas and dust. I borrowed "
    "my friend's notes afterwards and read them on the way home.",
    "Our garden is small, but it gets a lot of sunshine in the afternoon. This year we planted "
    "tomatoes, beans and a few rows of lettuce. The birds ate most of the strawberries before we "
    "could pick them, which made the children very unhappy.",
    "Researchers have found that people who sleep well remember more of what they learned the "
    "day before. During deep sleep the brain seems to replay and store new information. The "
    "study followed two hundred students over a whole semester.",
    "The museum opened a new exhibition about the history of the city harbour. Visitors can see "
    "old maps, models of ships and photographs of the workers who built the docks. The "
    "exhibition will stay open until the end of the summer.",
    "When the software update failed, the whole office lost access to its email for an hour. "
    "The technicians restored the previous version and promised to test the next update more "
    "carefully. Most people used the break to drink coffee and talk about the weekend.",
    "Walking in the mountains is a wonderful way to spend a holiday. You should always carry "
    "water, a map and warm clothes, because the weather can change very fast. Tell someone where "
    "you are going and when you expect to be back.",
]
OTHER = {
    "de": "Der Fluss stieg nach drei Tagen Regen sehr schnell an, und die Bauern brachten ihre "
    "Tiere auf höher gelegene Wiesen. Am Abend stand die alte Brücke schon unter Wasser. Niemand "
    "im Dorf konnte sich an ein solches Hochwasser erinnern, obwohl die Ältesten sagten, dass "
    "ihre Eltern davon erzählt hatten.",
    "fr": "Pour faire un bon pain, il suffit de farine, d'eau, de sel et de levure. La pâte doit "
    "reposer pendant plusieurs heures afin que le goût se développe. Il faut ensuite la cuire "
    "dans un four très chaud jusqu'à ce que la croûte soit bien dorée et que le pain sonne creux.",
    "es": "El comité se reunió el martes para hablar del presupuesto del próximo año. La mayoría "
    "de los miembros estuvo de acuerdo en que la biblioteca necesitaba más dinero para comprar "
    "libros nuevos y abrir durante más horas. La decisión final se tomará en la próxima reunión.",
    "ru": "Учиться играть на фортепиано нужно терпеливо. Начинающим лучше заниматься понемногу "
    "каждый день, а не много раз в неделю. Также полезно внимательно слушать хорошие записи, "
    "потому что слух должен понять, чего пытаются добиться руки.",
}
SHORT = "Click here"  # English, but at a score of 0.19: too short to tell, removed


def corpus(folder: Path) -> tuple[str, list[str], dict[int, str]]:
    """Three JSONL files (a glob, so 2 parts split by file): the English paragraphs with the
    other languages and a short phrase between them, and an exact copy of the German one.
    (glob, texts in document order, {id: language} of the non-English documents)."""
    texts = list(ENGLISH)
    for k, language in enumerate(OTHER):
        texts.insert(2 + 3 * k, OTHER[language])
    texts.insert(7, SHORT)
    texts.append(OTHER["de"])  # an exact copy: the exact step takes it, before language
    folder.mkdir()
    for k in range(3):
        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[k * 6 :][:6]]
        (folder / f"c{k}.jsonl").write_text("".join(lines), encoding="utf-8")
    assert sum(len(texts[k * 6 :][:6]) for k in range(3)) == len(texts)
    others = {texts.index(text): language for language, text in OTHER.items()}
    return str(folder / "c*.jsonl"), texts, others


def stage(source: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "curate", "source": source, "steps": ["exact", "language"],
            "language": {"keep": ["en"], "min_score": 0.5}, **extra}  # fmt: skip


@pytest.mark.parametrize("language", sorted(OTHER))
def test_identify_language_on_each_paragraph(language: str) -> None:
    found, score = identify_language(OTHER[language], LanguageOptions())
    assert found == language and score > 0.9
    for text in ENGLISH:
        assert identify_language(text, LanguageOptions())[0] == "en"


def test_identify_language_scores_only_the_prefix() -> None:
    """An English start and a long German rest: English when only the start is scored."""
    start = ENGLISH[0] + "\n"
    text = start + (OTHER["de"] + "\n") * 20
    assert identify_language(text, LanguageOptions())[0] == "de"
    head = LanguageOptions(prefix_bytes=len(start.encode("utf-8")))
    assert identify_language(text, head)[0] == "en"


def test_curate_language_removes_the_other_languages_with_language_and_score(
    tmp_path: Path,
) -> None:
    source, texts, others = corpus(tmp_path / "data")
    from pipeline.cli import main

    assert main(["run", str(recipe(tmp_path, {"curate": stage(source)}))]) == 0
    export = tmp_path / "runs" / "cur" / "curate" / "export"
    gone = removed(export, "language")
    short = texts.index(SHORT)
    assert set(gone) == {*others, short}
    for index, language in others.items():
        record = gone[index]
        assert record["language"] == language and record["language_score"] > 0.9
        assert record["reason"].startswith(f"language {language} (score ")
        assert record["reason"].endswith("not in keep [en]") and record["text"] == texts[index]
    assert gone[short]["language_score"] < 0.5 and "below min_score 0.5" in gone[short]["reason"]
    assert set(removed(export, "exact")) == {len(texts) - 1}
    kept = read_shards(export / "kept" / "data")
    assert [r["text"] for r in kept] == ENGLISH
    report = json.loads((export / "report.json").read_text())
    examples = next(s for s in report["sections"] if s["title"].startswith("Removed"))
    languages = [row[1].split(" (")[0] for row in examples["rows"] if row[0] == "language"]
    assert sorted(languages) == sorted(f"language {x}" for x in [*OTHER, "en"])


def test_curate_language_two_parts_give_the_bytes_of_one(tmp_path: Path) -> None:
    """With `lines` before it the step runs in the second pass, on the cut text."""
    source, _, _ = corpus(tmp_path / "data")
    from pipeline.cli import main

    two_passes = stage(source, steps=["exact", "lines", "language"])
    exports = []
    for parts in (1, 2):
        name = f"p{parts}"
        path = recipe(tmp_path, {"curate": {**two_passes, "parts": parts}}, name=name)
        assert main(["run", str(path)]) == 0
        export = tmp_path / "runs" / name / "curate" / "export"
        exports.append(export_files(export))
        assert "pass 1: analysing parts" in (export.parent / "stage.log").read_text()
    assert exports[0] == exports[1]
    assert any(name.startswith("removed/language/") for name in exports[0])


def test_curate_without_the_language_step_keeps_its_config_and_fingerprint(
    tmp_path: Path,
) -> None:
    """The `language` block is left out of the config a fingerprint hashes while it is at its
    defaults (recipes made before the step keep their fingerprints); set, it changes it."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    assert "language" not in Config(source=str(path)).model_dump()

    def fingerprint(curate: dict[str, Any]) -> str:
        stages = {"curate": {"kind": "curate", "source": str(path), **curate}}
        return fingerprints(validate_recipe({"name": "fp", "stages": stages}))["curate"]

    listed = {"steps": ["exact", "language"]}
    assert fingerprint(listed) != fingerprint({"steps": ["exact"]})
    assert fingerprint({**listed, "language": {"keep": ["en", "de"]}}) != fingerprint(listed)


BAD = {
    "empty keep": ({"keep": []}, "stages.curate.language.keep", "at least one language"),
    "unknown code": ({"keep": ["en", "eng"]}, "stages.curate.language.keep", "'eng' is not"),
    "min_score above 1": ({"min_score": 1.5}, "stages.curate.language.min_score", "1.5"),
    "min_score below 0": ({"min_score": -0.1}, "stages.curate.language.min_score", "-0.1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_curate_language_dry_run_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    options, field, expected = BAD[case]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    bad = {**stage(str(path)), "language": options}
    code, err = run_in_process(["run", str(recipe(tmp_path, {"curate": bad})), "--dry-run"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert field in lines[0] and expected in lines[0], lines[0]
