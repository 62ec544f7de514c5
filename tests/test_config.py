from pathlib import Path

import pytest

from edgekd.config import ProfileError, apply_overrides, load_profile, parse_override, profile_from_dict


def test_defaults_and_dataset_source_from_key():
    profile = profile_from_dict({"datasets": {"fashion-mnist": {"train_limit": 100}}})
    assert list(profile.datasets) == ["fashion-mnist"]
    assert profile.datasets["fashion-mnist"].source == "fashion-mnist"
    assert profile.methods["kd"]["kd"]["temperature"] == 4.0


@pytest.mark.parametrize("data, message", [
    ({"student": {"epoch": 3}}, "unknown profile key 'student.epoch': did you mean 'epochs'?"),
    ({"study": {"trainings_per_gpu": 2}}, "'study.trainings_per_gpu' is retired: set study.trainings_at_once = N"),
    ({"datasets": {"digits": {"image_sise": 16}}}, "unknown profile key 'datasets.digits.image_sise'"),
    ({"student": {"epochs": "three"}}, "profile key 'student.epochs' must be int"),
    ({"study": {"seeds": [0, "1"]}}, "profile key 'study.seeds[1]' must be int"),
    ({"study": {"seeds": []}}, "'study.seeds' is empty"),
    ({"teacher": {"optimizer": "adam"}}, "'teacher.optimizer' must be 'sgd' or 'adamw'"),
    ({"teacher": "resnet18"}, "profile key 'teacher' must be a table"),
    ({"student": {"small_input": 1}}, "profile key 'student.small_input' must be bool"),
])
def test_bad_profiles_name_the_key(data, message):
    with pytest.raises(ProfileError, match=None) as info:
        profile_from_dict(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_int_is_accepted_for_float():
    assert profile_from_dict({"student": {"lr": 1}}).student.lr == 1.0


def test_overrides_parse_toml_values(tiny_profile):
    assert parse_override("student.epochs=3") == (["student", "epochs"], 3)
    assert parse_override("study.seeds=[1, 2]") == (["study", "seeds"], [1, 2])
    assert parse_override("teacher.model=resnet10t") == (["teacher", "model"], "resnet10t")
    profile = load_profile(tiny_profile, ["student.epochs=5", "datasets.synthetic.classes=3"])
    assert profile.student.epochs == 5 and profile.datasets["synthetic"].classes == 3
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_override_errors(tiny_profile):
    with pytest.raises(ProfileError, match="key=value"):
        load_profile(tiny_profile, ["student.epochs"])
    with pytest.raises(ProfileError, match="unknown profile key 'student.epoc'"):
        load_profile(tiny_profile, ["student.epoc=3"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname=1")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(bad)


def test_study_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-study.toml"
    path.write_text("[student]\nepochs = 2\n")
    assert load_profile(path).study.name == "my-study"


def test_every_problem_of_a_profile_is_named_at_once():
    with pytest.raises(ProfileError) as info:
        profile_from_dict({"student": {"epoch": 3, "lr": -1.0}, "teacher": {"optimizer": "adam"},
                           "datasets": {"digits": {"val_fraction": 0.0, "channels": 2}},
                           "variants": {"half": {"kind": "fraction", "fraction": 2.0}}})
    lines = str(info.value).splitlines()
    assert lines == [
        "unknown profile key 'student.epoch': did you mean 'epochs'?",
        "profile key 'teacher.optimizer' must be 'sgd' or 'adamw', got 'adam'",
        "profile key 'student.lr' must be above 0, got -1.0",
        "profile key 'datasets.digits.channels' must be 0 (the native channels), 1 or 3, got 2",
        "profile key 'datasets.digits.val_fraction' must be in (0, 1): checkpoints are chosen on this share of the "
        "training data, got 0.0",
        "profile key 'variants.half.fraction' must be in (0, 1], got 2.0",
    ]


@pytest.mark.parametrize("data, message", [
    ({"study": {"device": "gpu"}}, "'study.device' must be auto, cpu, cuda or cuda:N"),
    ({"study": {"name": "a/b"}}, "'study.name' must be a directory name"),
    ({"study": {"seeds": [1, 1]}}, "'study.seeds' repeats a seed"),
    ({"methods": {"odd": {}}}, "profile table 'methods.odd' names no loss"),
    ({"student": {"checkpoint": "x.safetensors"}}, "'student.checkpoint' is for teachers"),
    ({"variants": {"v": {"kind": "corruption", "severities": [6]}}}, "'variants.v.severities' must be from 1"),
    ({"variants": {"v": {"kind": "label_noise", "rate": 0.2, "noise": "pairs", "pairs": [[0]]}}},
     "'variants.v.pairs' must be pairs of class indices"),
    ({"datasets": {}}, "profile table 'datasets' is empty"),
])
def test_values_out_of_range(data, message):
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data)
    assert message in str(info.value)


def test_variant_problems_against_the_data():
    from edgekd.config import VariantConfig, variant_problems

    assert variant_problems(VariantConfig(kind="per_class", per_class=50), "variants.v") == []
    assert variant_problems(VariantConfig(kind="per_class", per_class=50), "variants.v", 10, 40) == [
        "profile key 'variants.v.per_class' must be between 1 and 40, got 50"]
    assert "0..3" in variant_problems(VariantConfig(kind="classes", classes=[1, 4]), "variants.v", 4, 10)[0]


def test_empty_profile_names_a_starting_profile(tmp_path):
    path = tmp_path / "new.toml"
    path.write_text("# my study\n")
    with pytest.raises(ProfileError, match="is empty: start from a complete one, e.g. cp profiles/quickstart.toml"):
        load_profile(path)


def test_a_saved_profile_is_read_without_retired_keys():
    """A run saved before study.trainings_per_gpu was retired still reads (qat-kd, torchrun), without it."""
    from edgekd.config import saved_profile

    data = load_profile(Path(__file__).parents[1] / "profiles" / "quickstart.toml").to_dict()
    data["study"]["trainings_per_gpu"] = 2
    assert saved_profile(data).study.trainings_at_once == 0
