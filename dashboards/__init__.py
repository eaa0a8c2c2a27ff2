"""Reading finished sweeps into pandas, plotly figures and the HTML report."""
