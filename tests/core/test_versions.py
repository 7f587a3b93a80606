import logging

from qie.versions import known_problems


def test_known_bad_combinations_are_reported():
    messages = [m for _, m in known_problems({"diffusers": "0.42.1", "transformers": "5.24.0"})]
    assert any("mm_token_type_ids" in m for m in messages)
    levels = [lvl for lvl, m in known_problems({"diffusers": "0.35.0", "transformers": "4.57.0"})]
    assert levels == [logging.WARNING]
    torchao = known_problems({"diffusers": "0.42.1", "transformers": "5.10", "torch": "2.13.0+cpu", "torchao": "0.18"})
    assert [m for _, m in torchao] and "torchao" in torchao[0][1]


def test_fixed_upstream_combination_is_clean():
    assert known_problems({"diffusers": "0.43.0", "transformers": "5.24.0", "torch": "2.13.0"}) == []
