"""Analysis of tune-refilled experiments: leaderboards, plots and a report.

Run the scripts from the repository root (`python analysis/report.py EXPERIMENT --out DIR`)
or import their functions (`from analysis.compare_trials import leaderboard`).
"""
