"""Recipe loading and validation."""

import pytest

from omni_export.recipes import RecipeError, builtin_names, load_recipe, parse_recipe

VALID = {"schema_version": 1, "name": "mine", "dtype": "float32", "quantization": None, "components": ["thinker"]}


def test_builtin_fp32():
    assert "fp32" in builtin_names()
    recipe = load_recipe("fp32")
    assert (recipe.name, recipe.dtype, recipe.quantization, recipe.components) == ("fp32", "float32", None, ("thinker",))


def test_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nname: r\ndtype: float32\nquantization: null\ncomponents: [thinker]\n")
    assert load_recipe(str(path)).name == "r"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"extra": 1}, "unknown recipe key"),
        ({"schema_version": 2}, "schema_version"),
        ({"name": "Bad Name"}, "name"),
        ({"dtype": "int4"}, "dtype"),
        ({"quantization": {"method": "awq"}}, "quantization"),
        ({"components": []}, "components"),
        ({"components": ["talker9"]}, "components"),
    ],
)
def test_invalid_recipes(change, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe({**VALID, **change}, "recipes/mine.yaml")
    assert message in str(info.value)
    assert "recipes/mine.yaml" in str(info.value) and "fix:" in str(info.value)


def test_missing_key():
    data = dict(VALID)
    del data["dtype"]
    with pytest.raises(RecipeError, match="missing recipe key"):
        parse_recipe(data, "x.yaml")


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(str(bad))
