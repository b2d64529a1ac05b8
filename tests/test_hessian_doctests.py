"""The examples in flatlab.hessian's docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["flatlab.hessian", "flatlab.hessian.operator", "flatlab.hessian.trace",
           "flatlab.hessian.lanczos", "flatlab.hessian.density", "flatlab.hessian._krylov"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
    assert attempted > 0 or name == "flatlab.hessian"
