//! Projects: created by an admin, with members in roles, archived once.
//! A project always keeps an owner.

use std::collections::BTreeMap;

use ud_schemas::events::{
    ProjectArchived, ProjectCreated, ProjectEvent, ProjectMemberAdded, ProjectMemberRemoved,
    ProjectRoleChanged, Role,
};
use ud_schemas::{Millis, ProjectId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    pub id: ProjectId,
    pub description: String,
    pub members: BTreeMap<String, Role>,
    pub archived: bool,
}

impl Project {
    fn owners(&self) -> usize {
        self.members.values().filter(|r| **r == Role::Owner).count()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectCommand {
    /// Creates the project with its first owner.
    Create {
        description: String,
        owner: String,
    },
    /// Adds a member, or changes the role of one already in.
    SetMember {
        user: String,
        role: Role,
    },
    RemoveMember {
        user: String,
    },
    Archive,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProjectError {
    #[error("project not found")]
    NotFound,
    #[error("project exists already")]
    Exists,
    #[error("project is archived")]
    Archived,
    #[error("{0} is not a member")]
    NoMember(String),
    #[error("{0} is the project's last owner: make another member owner first")]
    LastOwner(String),
}

pub fn decide(
    project: Option<&Project>,
    command: ProjectCommand,
    now: Millis,
) -> Result<Vec<ProjectEvent>, ProjectError> {
    let p = match (project, command) {
        (None, ProjectCommand::Create { description, owner }) => {
            return Ok(vec![
                ProjectEvent::Created(ProjectCreated {
                    at: now,
                    description,
                }),
                ProjectEvent::MemberAdded(ProjectMemberAdded {
                    at: now,
                    user: owner,
                    role: Role::Owner,
                }),
            ])
        }
        (Some(_), ProjectCommand::Create { .. }) => return Err(ProjectError::Exists),
        (None, _) => return Err(ProjectError::NotFound),
        (Some(p), _) if p.archived => return Err(ProjectError::Archived),
        (Some(p), command) => (p, command),
    };
    let (project, command) = p;
    match command {
        ProjectCommand::Create { .. } => Err(ProjectError::Exists),
        ProjectCommand::SetMember { user, role } => match project.members.get(&user) {
            None => Ok(vec![ProjectEvent::MemberAdded(ProjectMemberAdded {
                at: now,
                user,
                role,
            })]),
            Some(r) if *r == role => Ok(vec![]),
            Some(Role::Owner) if project.owners() == 1 => Err(ProjectError::LastOwner(user)),
            Some(_) => Ok(vec![ProjectEvent::RoleChanged(ProjectRoleChanged {
                at: now,
                user,
                role,
            })]),
        },
        ProjectCommand::RemoveMember { user } => match project.members.get(&user) {
            None => Err(ProjectError::NoMember(user)),
            Some(Role::Owner) if project.owners() == 1 => Err(ProjectError::LastOwner(user)),
            Some(_) => Ok(vec![ProjectEvent::MemberRemoved(ProjectMemberRemoved {
                at: now,
                user,
            })]),
        },
        ProjectCommand::Archive => Ok(vec![ProjectEvent::Archived(ProjectArchived { at: now })]),
    }
}

pub fn evolve(project: Option<Project>, id: ProjectId, event: &ProjectEvent) -> Option<Project> {
    match (project, event) {
        (_, ProjectEvent::Created(e)) => Some(Project {
            id,
            description: e.description.clone(),
            members: BTreeMap::new(),
            archived: false,
        }),
        (None, _) => None,
        (Some(mut p), ProjectEvent::MemberAdded(e)) => {
            p.members.insert(e.user.clone(), e.role);
            Some(p)
        }
        (Some(mut p), ProjectEvent::RoleChanged(e)) => {
            p.members.insert(e.user.clone(), e.role);
            Some(p)
        }
        (Some(mut p), ProjectEvent::MemberRemoved(e)) => {
            p.members.remove(&e.user);
            Some(p)
        }
        (Some(mut p), ProjectEvent::Archived(_)) => {
            p.archived = true;
            Some(p)
        }
    }
}

impl crate::aggregate::Aggregate for Project {
    type Id = ProjectId;
    type Command = ProjectCommand;
    type Event = ProjectEvent;
    type Error = ProjectError;

    const STREAM: &'static str = ud_schemas::streams::AUTH;

    fn scope(id: &ProjectId) -> String {
        ud_schemas::subjects::project_all(id)
    }

    fn wrap(id: ProjectId, event: ProjectEvent) -> ud_schemas::Event {
        ud_schemas::Event::Project(id, event)
    }

    fn unwrap(event: ud_schemas::Event) -> Option<(ProjectId, ProjectEvent)> {
        match event {
            ud_schemas::Event::Project(id, e) => Some((id, e)),
            _ => None,
        }
    }

    fn decide(
        state: Option<&Self>,
        command: ProjectCommand,
        now: Millis,
    ) -> Result<Vec<ProjectEvent>, ProjectError> {
        decide(state, command, now)
    }

    fn evolve(state: Option<Self>, id: ProjectId, event: &ProjectEvent) -> Option<Self> {
        evolve(state, id, event)
    }

    fn settled(&self) -> bool {
        self.archived
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> ProjectId {
        ProjectId::parse("lab").unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn run(
        state: Option<Project>,
        command: ProjectCommand,
    ) -> Result<Option<Project>, ProjectError> {
        let events = decide(state.as_ref(), command, 1)?;
        Ok(events.iter().fold(state, |s, e| evolve(s, lab(), e)))
    }

    fn set(user: &str, role: Role) -> ProjectCommand {
        ProjectCommand::SetMember {
            user: user.into(),
            role,
        }
    }

    #[test]
    fn a_project_is_created_with_its_owner_and_keeps_one() -> Result<(), ProjectError> {
        let create = ProjectCommand::Create {
            description: "vision".into(),
            owner: "ada".into(),
        };
        let p = run(None, create.clone())?;
        assert_eq!(p.as_ref().map(|p| p.members.len()), Some(1));
        assert_eq!(run(p.clone(), create), Err(ProjectError::Exists));
        // The only owner can neither leave nor step down.
        assert_eq!(
            run(
                p.clone(),
                ProjectCommand::RemoveMember { user: "ada".into() }
            ),
            Err(ProjectError::LastOwner("ada".into()))
        );
        assert_eq!(
            run(p.clone(), set("ada", Role::Member)),
            Err(ProjectError::LastOwner("ada".into()))
        );
        // With a second owner she can.
        let p = run(p, set("bob", Role::Owner))?;
        let p = run(p, set("ada", Role::Viewer))?;
        assert_eq!(
            p.as_ref().and_then(|p| p.members.get("ada")),
            Some(&Role::Viewer)
        );
        // Setting the role a member has changes nothing.
        assert_eq!(decide(p.as_ref(), set("ada", Role::Viewer), 2), Ok(vec![]));
        let p = run(p, ProjectCommand::RemoveMember { user: "ada".into() })?;
        assert_eq!(
            p.as_ref().map(|p| p.members.contains_key("ada")),
            Some(false)
        );
        assert_eq!(
            run(
                p.clone(),
                ProjectCommand::RemoveMember { user: "ada".into() }
            ),
            Err(ProjectError::NoMember("ada".into()))
        );
        Ok(())
    }

    #[test]
    fn an_archived_project_takes_no_more_changes() -> Result<(), ProjectError> {
        let p = run(
            None,
            ProjectCommand::Create {
                description: String::new(),
                owner: "ada".into(),
            },
        )?;
        assert_eq!(
            run(None, set("bob", Role::Member)),
            Err(ProjectError::NotFound)
        );
        let p = run(p, ProjectCommand::Archive)?;
        assert!(p.as_ref().is_some_and(|p| p.archived));
        assert_eq!(
            run(p.clone(), set("bob", Role::Member)),
            Err(ProjectError::Archived)
        );
        assert_eq!(run(p, ProjectCommand::Archive), Err(ProjectError::Archived));
        Ok(())
    }
}
