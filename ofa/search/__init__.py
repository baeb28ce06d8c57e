"""Evolutionary search and Pareto fronts over the predictors (numpy only)."""
from .evolution import (Candidate, Constraints, Infeasible, Scorer, SearchCancelled, SearchResult,
                        SearchSettings, UnknownTarget, pareto_front, search)

__all__ = ["Candidate", "Constraints", "Infeasible", "Scorer", "SearchCancelled", "SearchResult",
           "SearchSettings", "UnknownTarget", "pareto_front", "search"]
