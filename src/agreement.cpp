// Cross-rank agreement for class-parallel calls (issue 10): placeholder, filled in next.
