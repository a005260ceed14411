"""Is a run healthy? Its history (history.py), checks (checks.py), the live callback (callback.py) and the
report page (report_html.py); tools/report.py is the command."""
