"""The layout search (docs/search.md): procedure.py proposes candidates in ModelOpt's PTQ order, driver.py runs
them as ordinary cached strategies and judges them with the recipe's gates, report.py writes what it found."""
