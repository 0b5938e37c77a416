import pytest

from transfer.registry import Registry, UnknownNameError, closest_match


def test_register_get_and_names():
    reg = Registry("thing")

    @reg.register("alpha")
    def build_alpha():
        return 1

    reg.add("beta", 2)
    assert reg.get("alpha") is build_alpha
    assert reg.names() == ["alpha", "beta"]
    assert "beta" in reg and "gamma" not in reg


def test_duplicate_and_uppercase_names_raise():
    reg = Registry("thing")
    reg.add("alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", 2)
    with pytest.raises(ValueError, match="lower-case"):
        reg.add("Alpha", 3)


def test_unknown_name_lists_names_and_closest_match():
    reg = Registry("backbone")
    for name in ("rs50", "rs152", "resnet50"):
        reg.add(name, name)
    with pytest.raises(UnknownNameError) as err:
        reg.get("rs15")
    text = str(err.value)
    assert "'rs15'" in text and "Did you mean 'rs152'" in text
    assert "rs50, rs152" in text or all(n in text for n in ("rs50", "rs152", "resnet50"))
    assert err.value.closest == "rs152"


def test_closest_match_none_when_nothing_is_close():
    assert closest_match("zzzzzz", ["rs50", "digits"]) is None
