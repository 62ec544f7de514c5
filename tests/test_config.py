import pytest

from edgekd.config import ProfileError, apply_overrides, load_profile, parse_override, profile_from_dict


def test_defaults_and_dataset_source_from_key():
    profile = profile_from_dict({"datasets": {"fashion-mnist": {"train_limit": 100}}})
    assert list(profile.datasets) == ["fashion-mnist"]
    assert profile.datasets["fashion-mnist"].source == "fashion-mnist"
    assert profile.methods["kd"]["kd"]["temperature"] == 4.0


@pytest.mark.parametrize("data, message", [
    ({"student": {"epoch": 3}}, "unknown profile key 'student.epoch': did you mean 'epochs'?"),
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
