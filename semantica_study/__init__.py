"""The paper-claims study harness (`python -m semantica_study`): spec, runner, stats, report, cli.
"""
