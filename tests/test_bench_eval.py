from conftest import ckpt, mlvu, scripted  # noqa: F401  (only for test_robust.py: it should import these from conftest)
