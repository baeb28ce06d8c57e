"""Evolutionary search and Pareto fronts over the predictors (numpy only)."""
from .evolution import Candidate, Infeasible, SearchCancelled, SearchResult, pareto_front, search
from .scorer import Constraints, Scorer, SearchSettings, UnknownTarget

__all__ = ["Candidate", "Constraints", "Infeasible", "Scorer", "SearchCancelled", "SearchResult",
           "SearchSettings", "UnknownTarget", "pareto_front", "search"]
