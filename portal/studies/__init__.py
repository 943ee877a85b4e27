"""Study list, study page and viewer."""
